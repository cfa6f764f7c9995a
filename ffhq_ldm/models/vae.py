"""Stage-1 autoencoders (diffusers AutoencoderKL / VQModel) and their latent scale.

The latent scale is measured, never assumed: ``scaling_factor = 1 / std(latents)`` over
training images, written into the exported config. (0.18215 is Stable Diffusion's number; it
is wrong for any other autoencoder, and diffusers fills it in silently when it is missing.)
"""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from ..config import VAEConfig

AUTOENCODER_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


class VAELoadError(ValueError):
    """The given path is not an exported autoencoder this package can use."""


def build_vae(config: VAEConfig):
    """A freshly initialised AutoencoderKL or VQModel for ``config``."""
    levels = len(config.block_out_channels)
    common = dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution,
        # Placeholder until measured at export; 1.0 keeps latents unscaled meanwhile.
        scaling_factor=1.0,
    )
    if config.autoencoder == "kl":
        return AutoencoderKL(**common)
    return VQModel(**common, num_vq_embeddings=config.num_vq_embeddings,
                   vq_embed_dim=config.latent_channels)


def is_vq(vae) -> bool:
    return isinstance(vae, VQModel)


def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of ``images`` in [-1, 1] (unscaled latents).

    For a VQModel the "posterior" is the encoder's pre-quantisation output with zero std:
    decoding quantises it, as LDM's VQ first stage does.
    """
    if is_vq(vae):
        h = vae.encode(images).latents
        return h, torch.zeros_like(h)
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def decoder_last_layer(vae) -> torch.Tensor:
    """The weight the adaptive GAN weight differentiates against (LDM: decoder.conv_out)."""
    return vae.decoder.conv_out.weight


@torch.no_grad()
def measure_scaling_factor(vae, batches, generator: torch.Generator | None = None) -> float:
    """``1 / std`` of sampled latents over all given image batches (two-pass-free, float64)."""
    total, total_sq, count = 0.0, 0.0, 0
    for images in batches:
        mean, std = encode_posterior(vae, images)
        z = mean + std * torch.randn(mean.shape, generator=generator,
                                     dtype=mean.dtype).to(mean.device)
        z = z.double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
    if count == 0:
        raise ValueError("no images to measure the latent scale on")
    var = total_sq / count - (total / count) ** 2
    return float(1.0 / max(var, 1e-12) ** 0.5)


def fingerprint(vae) -> str:
    """sha256 over the model's config and weights: binds a latent cache to its autoencoder."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class LatentCodec:
    """What the latent cache needs of an autoencoder, built by the caller.

    ``ffhq_ldm.data`` never imports the models; the cache builder and loader get one of these:
    ``encode(images) -> (mean, std)`` of the posterior (unscaled), the ``fingerprint`` that binds
    a cache to these weights, the measured ``scaling_factor``, the autoencoder's ``sample_size``
    and the ``latent_shape`` (C, h, w) of one image's latents.
    """

    def __init__(self, vae):
        self.vae = vae

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the config and weights, computed once (the codec's weights are fixed)."""
        return fingerprint(self.vae)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def sample_size(self) -> int:
        return int(self.vae.config.sample_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.vae.config
        channels = config.latent_channels
        if is_vq(self.vae):  # the pre-quantisation output has the codebook's width
            channels = config.get("vq_embed_dim") or channels
        side = self.sample_size // 2 ** (len(config.block_out_channels) - 1)
        return (int(channels), side, side)

    def to(self, device) -> LatentCodec:
        self.vae = self.vae.to(device).eval()
        return self

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_posterior(self.vae, images)


def load_vae(path, allow_pickle: bool = False):
    """Load an exported autoencoder folder, with clear errors for anything else."""
    from ..cli_common import UsageError
    from ..io import recover_dir
    from .export_checks import check_vae_config

    path = Path(path)
    recover_dir(path)  # an export killed between its two renames left only path.old
    config_path = path / "config.json"
    if not path.is_dir() or not config_path.is_file():
        raise VAELoadError(f"{path} is not an exported autoencoder (no config.json); pass the "
                           "'vae' folder written by training/train_vae.py")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise VAELoadError(f"{config_path} is not valid JSON: {exc}") from None
    cls = AUTOENCODER_CLASSES.get(config.get("_class_name"))
    if cls is None:
        raise VAELoadError(f"{path} holds a {config.get('_class_name')!r}, not an AutoencoderKL or "
                           "VQModel")
    if "scaling_factor" not in config:
        raise VAELoadError(f"{config_path} has no scaling_factor: export it with "
                           "training/train_vae.py, which measures it (diffusers would silently use "
                           "Stable Diffusion's 0.18215)")
    try:
        check_vae_config(config, config_path)
    except UsageError as exc:
        raise VAELoadError(str(exc)) from None
    if not any(path.glob("*.safetensors")) and not allow_pickle:
        raise VAELoadError(f"{path} has no .safetensors weights; pickled weights can run code "
                           "when loaded and are refused")
    return cls.from_pretrained(path, use_safetensors=not allow_pickle)


class Reconstructor(torch.nn.Module):
    """``x -> (x̂, posterior mean, posterior logvar, vq_loss)`` in one forward call.

    The trainer wraps this module (not the VAE's encode/decode methods) with accelerate, so
    distributed data parallel sees a single forward and synchronises all the VAE's gradients.
    With ``last_layer=False`` the first output is the input ``h`` of the decoder's last layer
    instead (``x̂ = vae.decoder.conv_out(h)``): the training step applies that layer itself, so
    that the adaptive GAN weight's gradients with respect to it stay outside a compiled graph.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, last_layer: bool = True):
        if not last_layer:
            return self._before_last_layer(x, sample_posterior)
        if is_vq(self.vae):
            h = self.vae.encode(x).latents
            out = self.vae.decode(h, return_dict=True)
            return out.sample, None, None, out.commit_loss
        dist = self.vae.encode(x).latent_dist
        z = dist.sample() if sample_posterior else dist.mode()
        return self.vae.decode(z).sample, dist.mean, dist.logvar, None

    def _before_last_layer(self, x: torch.Tensor, sample_posterior: bool):
        """The same computation as ``forward``, stopped before ``decoder.conv_out`` (the steps
        of diffusers' ``decode`` for this configuration: no tiling, no spatial norm)."""
        vae = self.vae
        if is_vq(vae):
            quant, commit_loss, _ = vae.quantize(vae.encode(x).latents)
            mean = logvar = None
            z = vae.post_quant_conv(quant)
        else:
            dist = vae.encode(x).latent_dist
            z = dist.sample() if sample_posterior else dist.mode()
            mean, logvar, commit_loss = dist.mean, dist.logvar, None
            if vae.post_quant_conv is not None:
                z = vae.post_quant_conv(z)
        dec = vae.decoder
        h = dec.mid_block(dec.conv_in(z), None)
        for block in dec.up_blocks:
            h = block(h, None)
        return dec.conv_act(dec.conv_norm_out(h)), mean, logvar, commit_loss
