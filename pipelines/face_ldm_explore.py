"""Interpolation, DDIM inversion and inpainting for FaceLDMPipeline.

Companion of ``pipeline_face_ldm.py``: it imports only torch and diffusers (and numpy and
Pillow, which diffusers itself requires), and an exported pipeline folder carries it beside
``pipeline.py``, so every method below also works on an export loaded with

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)

The DDIM formulas are those of Song et al. 2021, "Denoising Diffusion Implicit Models",
eq. 12 with sigma_t = 0: with abar the cumulative product of (1 - beta),

    x0_hat   = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    x_prev   = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps

Inversion runs the same step from abar_prev up to abar_t, with eps evaluated at the current
(less noisy) latent and the timestep t that sampling will use on the way back: the Euler
discretisation of the probability-flow ODE in reverse (Song et al. 2021, section 4.3), exact
in the limit of many steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, ImagePipelineOutput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class InversionOutput(BaseOutput):
    """``noise``: the starting noise that DDIM (eta 0) maps back to ``latents``;
    ``latents``: the encoded images (posterior mean times the scaling factor)."""

    noise: torch.Tensor
    latents: torch.Tensor


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical linear interpolation between ``a`` (t = 0) and ``b`` (t = 1).

    Shoemake 1985, "Animating rotation with quaternion curves": with theta the angle between
    the flattened vectors, ``sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b``.
    For vectors of equal norm every point of the path has that norm (Gaussian noises of the
    same shape have nearly equal norms), which linear interpolation does not keep. Computed
    in float64; nearly parallel vectors fall back to linear interpolation.
    """
    a64, b64 = a.double(), b.double()
    cos = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm()).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(theta.sin()) < 1e-6:
        out = (1 - t) * a64 + t * b64
    else:
        out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / theta.sin()
    return out.to(a.dtype)


def _to_unit_images(images, name: str) -> torch.Tensor:
    """PIL image(s) or an (N, C, H, W) / (C, H, W) tensor in [0, 1] -> float (N, C, H, W)."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"{name}: no images given")
        if all(isinstance(im, PIL.Image.Image) for im in images):
            mode = "L" if name == "mask" else "RGB"
            arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images]
            arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"{name}: images of different sizes")
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        images = torch.stack([torch.as_tensor(im) for im in images])
    if not torch.is_tensor(images):
        raise ValueError(f"{name}: expected PIL images or a tensor, got {type(images).__name__}")
    images = images.float()
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"{name}: expected (N, C, H, W), got shape {tuple(images.shape)}")
    if images.min() < 0 or images.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1]")
    return images


class FaceLDMExploreMixin:
    """Methods that FaceLDMPipeline gains: ``seed_noise``, ``interpolate``, ``encode_images``,
    ``invert`` and ``inpaint``. They use ``self.vae``, ``self.unet``, ``self.scheduler``."""

    # -- shapes and noise ----------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return self.unet.config.in_channels, height, width

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images this pipeline makes and reads."""
        _, height, width = self.latent_shape()
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return height * factor, width * factor

    def seed_noise(self, seeds: list[int]) -> torch.Tensor:
        """The starting noise of each seed, float32 on the CPU: the same noise that
        ``pipe(generator=torch.Generator().manual_seed(seed))`` starts from."""
        shape = self.latent_shape()
        return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(
            int(s))) for s in seeds])

    # -- interpolation -------------------------------------------------------------------------
    @torch.no_grad()
    def interpolate(self, start: torch.Tensor, end: torch.Tensor, num_frames: int = 16,
                    num_inference_steps: int = 50, output_type: str = "pil",
                    batch_size: int = 8, decode_chunk_size: int = 16):
        """Images along the slerp path between two starting noises, sampled with eta 0.

        Frame k uses ``slerp(start, end, k / (num_frames - 1))``: the first and last frames
        are the images of ``start`` and ``end`` themselves (e.g. of two seeds' noises, see
        ``seed_noise``, or of two ``invert`` results). The scheduler should be deterministic
        (DDIM with eta 0, the default): the path is then a continuous map of the noise.
        """
        if num_frames < 2:
            raise ValueError("num_frames must be >= 2")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        start, end = (x[0] if x.ndim == 4 else x for x in (start, end))
        shape = self.latent_shape()
        if tuple(start.shape) != shape or tuple(end.shape) != shape:
            raise ValueError(f"start and end must have shape {shape}, got "
                             f"{tuple(start.shape)} and {tuple(end.shape)}")
        noises = torch.stack([slerp(start.float().cpu(), end.float().cpu(), k / (num_frames - 1))
                              for k in range(num_frames)])
        parts = []
        for chunk in noises.split(batch_size):
            parts.append(self(latents=chunk, num_inference_steps=num_inference_steps, eta=0.0,
                              output_type=output_type, decode_chunk_size=decode_chunk_size).images)
        if output_type == "pil":
            images = [im for part in parts for im in part]
        elif output_type == "np":
            images = np.concatenate(parts)
        else:
            images = torch.cat(parts)
        return ImagePipelineOutput(images=images)

    # -- encoding and inversion ----------------------------------------------------------------
    def _check_images(self, images, name: str = "images") -> torch.Tensor:
        x = _to_unit_images(images, name)
        want = self.image_size()
        if tuple(x.shape[-2:]) != want:
            raise ValueError(f"{name} must be {want[1]}x{want[0]} pixels (the model's size), got "
                             f"{x.shape[-1]}x{x.shape[-2]}")
        return x

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Images (PIL, or tensors in [0, 1]) -> scaled latents: the posterior mean (KL), or the
        encoder output before quantisation (VQ; the decoder quantises), times scaling_factor."""
        scale = self._check_scaling_factor()
        x = self._check_images(images)
        if x.shape[1] != 3:
            raise ValueError(f"images must have 3 channels, got {x.shape[1]}")
        x = (x * 2 - 1).to(device=self._execution_device, dtype=self.vae.dtype)
        out = self.vae.encode(x)
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return latents.float() * scale

    def _ddim(self, num_inference_steps: int):
        """(timesteps descending, alphas_cumprod (float64), final abar, step ratio) of the
        pipeline's DDIM scheduler, as DDIMScheduler.step uses them."""
        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(f"this needs a DDIM scheduler, not {type(self.scheduler).__name__}: "
                             "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps)
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        return (sched.timesteps.tolist(), sched.alphas_cumprod.double(),
                float(sched.final_alpha_cumprod), ratio)

    def _eps(self, model_output: torch.Tensor, x: torch.Tensor, abar: float) -> torch.Tensor:
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":  # Salimans & Ho 2022, v = sqrt(abar) eps - sqrt(1-abar) x0
            return math.sqrt(abar) * model_output + math.sqrt(1 - abar) * x
        raise ValueError(f"inversion needs an epsilon or v prediction, not {kind!r}")

    @torch.no_grad()
    def invert(self, images=None, num_inference_steps: int = 50, latents: torch.Tensor = None):
        """DDIM inversion: the starting noise from which DDIM with eta 0 and the same number
        of steps regenerates ``images`` (or given scaled ``latents``). Re-sample the returned
        noise with ``pipe(latents=noise, eta=0)`` to reconstruct, or with eta > 0 and a
        generator for variations that keep the image's broad layout."""
        if (images is None) == (latents is None):
            raise ValueError("give exactly one of images or latents")
        z = self.encode_images(images) if images is not None else latents.float()
        timesteps, abar, final, ratio = self._ddim(num_inference_steps)
        device, dtype = self._execution_device, self.unet.dtype
        x = z.to(device=device, dtype=torch.float64)
        for t in self.progress_bar(list(reversed(timesteps))):
            prev = t - ratio
            a_prev = float(abar[prev]) if prev >= 0 else final
            a_t = float(abar[t])
            out = self.unet(x.to(dtype), torch.tensor(t, device=device)).sample.double()
            eps = self._eps(out, x, a_t)
            x0 = (x - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
            x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
        return InversionOutput(noise=x.float(), latents=z)

    # -- inpainting ----------------------------------------------------------------------------
    def latent_mask(self, mask) -> torch.Tensor:
        """A pixel mask (1 or white = fill in) -> (N, 1, h, w) on the latent grid: a latent
        cell is filled in when any pixel it covers is, so the hole is always regenerated."""
        m = self._check_images(mask, "mask")
        if m.shape[1] != 1:
            m = m.mean(1, keepdim=True)
        m = (m > 0.5).float()
        _, height, width = self.latent_shape()
        return (F.adaptive_max_pool2d(m, (height, width)) > 0).float()

    @torch.no_grad()
    def inpaint(self, image, mask, num_inference_steps: int = 50, generator=None,
                eta: float = 0.0, resample_steps: int = 1, output_type: str = "pil",
                decode_chunk_size: int = 16):
        """Fill in the masked part of ``image`` (mask: 1 or white = fill in) in latent space.

        Masked sampling in latent space, as the LDM code base samples an unconditional model
        with a mask (the replacement method of Song, Sohl-Dickstein et al. 2021, "Score-Based
        Generative Modeling through Stochastic Differential Equations", appendix on
        imputation): after every DDIM step to timestep s, the known latent cells are replaced
        by the encoded image noised to s, ``sqrt(abar_s) z + sqrt(1 - abar_s) noise``, and at
        the end by the encoded image itself. ``resample_steps`` U > 1 adds RePaint's resampling
        (Lugmayr et al. 2022, "RePaint", Algorithm 1, jump length 1): each step is redone U
        times, going back up by ``q(x_t | x_s)``, ``x_t = sqrt(abar_t / abar_s) x_s +
        sqrt(1 - abar_t / abar_s) noise``, so the generated part harmonises with the known one.
        """
        from diffusers.utils import numpy_to_pil

        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}")
        if resample_steps < 1:
            raise ValueError("resample_steps must be >= 1")
        z = self.encode_images(image)
        m = self.latent_mask(mask)
        if m.shape[0] not in (1, z.shape[0]):
            raise ValueError(f"{m.shape[0]} masks for {z.shape[0]} images")
        timesteps, abar, final, ratio = self._ddim(num_inference_steps)
        device, dtype = self._execution_device, self.unet.dtype
        z, m = z.to(device), m.to(device)
        if isinstance(generator, list) and len(generator) != z.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {z.shape[0]} images")

        def noise():
            return randn_tensor(z.shape, generator=generator, device=device, dtype=torch.float32)

        x = noise().to(dtype)
        step_kwargs = self._extra_step_kwargs(generator, eta)
        for t in self.progress_bar(timesteps):
            prev = t - ratio
            a_prev = float(abar[prev]) if prev >= 0 else final
            a_t = float(abar[t])
            for u in range(resample_steps):
                out = self.unet(x, torch.tensor(t, device=device)).sample
                x_prev = self.scheduler.step(out, t, x, **step_kwargs).prev_sample.float()
                known = (math.sqrt(a_prev) * z + math.sqrt(1 - a_prev) * noise()
                         if prev >= 0 else z)
                x_prev = m * x_prev + (1 - m) * known
                if u < resample_steps - 1:
                    x = (math.sqrt(a_t / a_prev) * x_prev
                         + math.sqrt(1 - a_t / a_prev) * noise()).to(dtype)
            x = x_prev.to(dtype)
        if output_type == "latent":
            images = x
        else:
            images = (self.decode_latents(x, decode_chunk_size) / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
            elif output_type == "pil":
                images = numpy_to_pil(images.cpu().permute(0, 2, 3, 1).numpy())
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images)


__all__ = ["FaceLDMExploreMixin", "InversionOutput", "slerp"]
