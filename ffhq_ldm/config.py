"""Configuration: one frozen dataclass per stage, named presets in one table.

Every setting has exactly one owner:
- ``VAEConfig`` owns stage 1 (autoencoder architecture, its loss, its optimisation).
- ``UNetConfig`` owns stage 2 (UNet architecture, noise schedule, optimisation, EMA).
- The latent shape is owned by the autoencoder: the UNet's ``sample_size`` and channel count
  are read from the exported VAE, never configured twice.
- Mixed precision and process count are owned by ``accelerate_config.yaml``.

Each training run writes its resolved config as JSON beside its outputs, and every field can
be overridden on the command line (``--learning-rate 1e-4``, ``--block-out-channels 64,128``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path


def mix_seed(seed: int, index: int) -> int:
    """The one rule that derives a seed from a run's seed and an index (an epoch, a step, an
    image): distinct indices of one seed never collide, and neighbouring seeds stay apart."""
    return int(seed) * 1_000_003 + int(index)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_types(config) -> None:
    """Every field has its declared type (a JSON config may hold ``"step": "20"``); numbers
    are finite."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, typ = getattr(config, f.name), hints[f.name]
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
              tuple: lambda v: isinstance(v, tuple) and all(
                  isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)}[typ]
        if not ok(value):
            kind = {tuple: "a list of positive integers", float: "a finite number"}.get(
                typ, f"a{'n' if typ is int else ''} {typ.__name__}")
            raise ConfigError(f"{_option(f.name)} must be {kind}, not {value!r}")


def check_ranges(config, rules: dict[str, tuple]) -> None:
    """``rules``: field -> (low, high, low_open, high_open); None = unbounded on that side."""
    for name, (low, high, low_open, high_open) in rules.items():
        value = getattr(config, name)
        bad_low = low is not None and (value <= low if low_open else value < low)
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            lo = "" if low is None else f"{low} {'<' if low_open else '<='} "
            hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
            raise ConfigError(f"{_option(name)} must satisfy {lo}{name}{hi}, not {value!r}")


POSITIVE = (1, None, False, False)  # an integer >= 1
NON_NEGATIVE = (0, None, False, False)
RATE = (0, None, True, False)  # > 0
BETA = (0, 1, False, True)  # Adam betas: 0 <= beta < 1


@dataclass(frozen=True)
class VAEConfig:
    """Stage 1: the autoencoder, its LPIPS + L1 + KL/VQ + PatchGAN loss, and its optimiser."""

    # architecture (diffusers AutoencoderKL / VQModel)
    autoencoder: str = "kl"  # "kl" (AutoencoderKL) or "vq" (VQModel)
    resolution: int = 128
    block_out_channels: tuple = (128, 256, 512)  # one entry per level: f = 2**(len-1)
    layers_per_block: int = 2
    latent_channels: int = 3
    norm_num_groups: int = 32
    num_vq_embeddings: int = 8192  # LDM vq-f4
    # loss (LDM / taming LPIPSWithDiscriminator)
    perceptual: str = "lpips-vgg"  # lpips-vgg | lpips-alex | lpips-vgg-random-trunk | none
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_start: int = 50001  # LDM kl-f4; the paper: the discriminator at 50k "greatly improved"
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_channels: int = 64
    # optimisation
    learning_rate: float = 4.5e-6 * 16  # LDM: 4.5e-6 per sample of batch
    adam_beta1: float = 0.5  # LDM/taming: Adam betas (0.5, 0.9) for autoencoder and discriminator
    adam_beta2: float = 0.9
    batch_size: int = 16
    max_steps: int = 200_000
    grad_clip: float = 0.0  # 0 disables; LDM does not clip the autoencoder
    # bookkeeping
    seed: int = 0
    holdout: int = 256  # images held out for reconstruction metrics
    eval_every: int = 5000
    checkpoint_every: int = 5000
    scale_images: int = 2048  # images used to measure the latent scaling factor
    num_workers: int = 2

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    def validate(self) -> VAEConfig:
        check_types(self)
        check_ranges(self, {
            **dict.fromkeys(("resolution", "layers_per_block", "latent_channels",
                             "norm_num_groups", "num_vq_embeddings", "disc_layers",
                             "disc_channels", "batch_size", "max_steps", "eval_every",
                             "checkpoint_every", "scale_images"), POSITIVE),
            **dict.fromkeys(("perceptual_weight", "kl_weight", "codebook_weight", "disc_start",
                             "disc_weight", "grad_clip", "holdout", "num_workers", "seed"),
                            NON_NEGATIVE),
            "learning_rate": RATE, "adam_beta1": BETA, "adam_beta2": BETA})
        if not self.block_out_channels:
            raise ConfigError("--block-out-channels needs at least one entry")
        if self.autoencoder not in ("kl", "vq"):
            raise ConfigError(f"autoencoder must be 'kl' or 'vq', not {self.autoencoder!r}")
        if self.resolution % self.downsample_factor:
            raise ConfigError(
                f"--resolution {self.resolution} is not a multiple of the autoencoder's "
                f"downsample factor {self.downsample_factor} (block_out_channels="
                f"{self.block_out_channels})")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"every entry of block_out_channels={self.block_out_channels} must be divisible "
                f"by norm_num_groups={self.norm_num_groups}")
        if self.perceptual not in PERCEPTUAL_CHOICES:
            raise ConfigError(f"perceptual must be one of {PERCEPTUAL_CHOICES}, "
                              f"not {self.perceptual!r}")
        return self


BETA_SCHEDULES = ("scaled_linear", "linear", "cosine")
PERCEPTUAL_CHOICES = ("lpips-vgg", "lpips-alex", "lpips-vgg-random-trunk", "none")
# What to do with images smaller than the training resolution.
SMALL_IMAGE_POLICIES = ("upscale", "skip")


@dataclass(frozen=True)
class UNetConfig:
    """Stage 2: the ADM-style UNet, the DDPM noise schedule, the optimiser and the EMA."""

    # architecture (diffusers UNet2DModel, ADM / LDM naming in comments)
    block_out_channels: tuple = (192, 384, 576, 768)  # model_channels 192 x channel_mult 1,2,3,4
    layers_per_block: int = 2  # num_res_blocks
    attention_resolutions: tuple = (32, 16, 8)  # latent resolutions with self-attention
    mid_attention: bool = True  # the "global" attention layer in the middle block
    attention_head_dim: int = 32  # num_head_channels
    norm_num_groups: int = 32
    # LDM's FFHQ UNet adds the time embedding ("default"); ADM's use_scale_shift_norm is
    # "scale_shift". The paper: "a projection of the timestep embedding is added".
    resnet_time_scale_shift: str = "default"
    dropout: float = 0.0
    # noise schedule: LDM "linear" = diffusers scaled_linear with these endpoints
    num_train_timesteps: int = 1000
    # scaled_linear (LDM's "linear", the paper) | linear | cosine (Nichol & Dhariwal 2021)
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "epsilon"  # epsilon (paper) | v_prediction
    snr_gamma: float = 0.0  # min-SNR-gamma weighting (Hang et al. 2023); 0 = off (paper)
    rescale_zero_terminal_snr: bool = False
    # optimisation
    learning_rate: float = 1e-4  # LDM: 2e-6 per sample would be 1.28e-4 at batch 64
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    batch_size: int = 64
    max_steps: int = 600_000  # the paper
    ema_decay: float = 0.9999
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 10_000
    preview_every: int = 10_000
    preview_steps: int = 50
    preview_images: int = 16

    def validate(self) -> UNetConfig:
        check_types(self)
        check_ranges(self, {
            **dict.fromkeys(("layers_per_block", "attention_head_dim", "norm_num_groups",
                             "num_train_timesteps", "batch_size", "max_steps",
                             "checkpoint_every", "preview_every", "preview_steps",
                             "preview_images"), POSITIVE),
            **dict.fromkeys(("weight_decay", "warmup_steps", "grad_clip", "snr_gamma", "seed"),
                            NON_NEGATIVE),
            "dropout": (0, 1, False, True), "learning_rate": RATE, "adam_beta1": BETA,
            "adam_beta2": BETA, "ema_decay": (0, 1, True, True),
            "beta_start": (0, 1, True, True), "beta_end": (0, 1, True, True)})
        if not self.block_out_channels:
            raise ConfigError("--block-out-channels needs at least one entry")
        if self.beta_schedule != "cosine" and self.beta_start >= self.beta_end:
            raise ConfigError(f"--beta-start {self.beta_start} must be below --beta-end "
                              f"{self.beta_end}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ConfigError("--resnet-time-scale-shift must be default or scale_shift, not "
                              f"{self.resnet_time_scale_shift!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError("prediction_type must be epsilon or v_prediction, "
                              f"not {self.prediction_type!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, "
                              f"not {self.beta_schedule!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(
                f"every entry of block_out_channels={self.block_out_channels} must be divisible "
                f"by norm_num_groups={self.norm_num_groups}")
        if self.snr_gamma < 0:
            raise ConfigError("snr_gamma must be >= 0 (0 disables min-SNR weighting)")
        return self


# ---------------------------------------------------------------------------------------------
# Presets: the paper's model, its latent-size variants, and small ones for CPU demo and tests.
# Each preset is a pair of overrides on the dataclass defaults (the defaults are the paper's).

def _vae_f(factor: int, latent_channels: int) -> dict:
    """Autoencoder with f = ``factor`` at 128 px: channels 128, 256, 512, 512, ... (LDM)."""
    levels = {2: 2, 4: 3, 8: 4, 16: 5}[factor]
    channels = (128, 256, 512, 512, 512)[:levels]
    return dict(block_out_channels=channels, latent_channels=latent_channels)


PRESETS: dict[str, dict[str, dict]] = {
    # The paper: AutoencoderKL f=4 (32x32x3 latents, LDM kl-f4), UNet with 192 base channels.
    "ffhq128-f4": {"vae": _vae_f(4, 3), "unet": {}},
    # The latent sizes the paper explored, from 64x64x1 to 8x8x4.
    "ffhq128-f2": {"vae": _vae_f(2, 1), "unet": {}},
    "ffhq128-f8": {"vae": _vae_f(8, 4), "unet": {}},
    "ffhq128-f16": {"vae": _vae_f(16, 4), "unet": {}},
    # Small enough to train both stages on a 2-core CPU in minutes (make demo). No perceptual
    # term: the real LPIPS trunk needs a download, and a random-trunk VGG at 128 px costs more
    # on a CPU than the whole autoencoder (see README).
    "demo": {
        # Measured on a 2-core CPU with native bf16 (docs/demo.md): the autoencoder trains at
        # ~15 img/s in bf16 (400 steps, ~4 min), the UNet at ~66 img/s (700 steps, ~7 min with
        # its latent cache).
        "vae": dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                    norm_num_groups=8, perceptual="none", disc_start=10**9,
                    learning_rate=1e-3, batch_size=8, max_steps=400, holdout=64,
                    eval_every=200, checkpoint_every=200, scale_images=1024, num_workers=1),
        "unet": dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1,
                     attention_resolutions=(8, 4), attention_head_dim=32, norm_num_groups=16,
                     learning_rate=1e-3, warmup_steps=100, batch_size=32, max_steps=700,
                     ema_decay=0.995, checkpoint_every=350, preview_every=350,
                     preview_images=16),
    },
    # For tests: 32 px images, a few thousand parameters, runs in seconds.
    "tiny": {
        "vae": dict(resolution=32, block_out_channels=(8, 16), layers_per_block=1,
                    latent_channels=4, norm_num_groups=4, num_vq_embeddings=64,
                    perceptual="lpips-vgg-random-trunk", disc_start=10**9, disc_layers=2,
                    disc_channels=8, learning_rate=1e-3, batch_size=8, max_steps=12,
                    holdout=8, eval_every=6, checkpoint_every=6, scale_images=64,
                    num_workers=0),
        "unet": dict(block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(8,),
                     attention_head_dim=8, norm_num_groups=4, learning_rate=1e-3,
                     warmup_steps=2, batch_size=8, max_steps=12, ema_decay=0.99,
                     checkpoint_every=6, preview_every=12, preview_steps=5, preview_images=4),
    },
}


# The demo's models trained longer on bigger batches, for `make demo` on a GPU. Sized by
# estimate for about five minutes in all on one H100-class GPU (not yet measured there).
PRESETS["demo-gpu"] = {
    "vae": {**PRESETS["demo"]["vae"], "batch_size": 32, "max_steps": 6000, "holdout": 256,
            "eval_every": 2000, "checkpoint_every": 2000, "scale_images": 2048,
            "num_workers": 4},
    "unet": {**PRESETS["demo"]["unet"], "warmup_steps": 200, "batch_size": 128,
             "max_steps": 8000, "ema_decay": 0.999, "checkpoint_every": 2000,
             "preview_every": 2000},
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, stage: str):
    """The resolved, validated config of ``stage`` ("vae" or "unet") for preset ``name``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    cls = {"vae": VAEConfig, "unet": UNetConfig}[stage]
    return cls(**PRESETS[name][stage]).validate()


# ---------------------------------------------------------------------------------------------
# Command-line overrides: every field becomes --field-name, parsed by its declared type.

def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def _parse_tuple(text: str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for t in items:
        try:
            out.append(int(t))
        except ValueError:
            out.append(float(t))
    return tuple(out)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """Add an optional ``--field-name`` for each field of ``cls`` (default: the preset's)."""
    group = parser.add_argument_group(f"{cls.__name__} overrides (default: the preset's value)")
    defaults = cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        typ = _field_type(cls, f)
        conv = {int: int, float: float, str: str, bool: _parse_bool, tuple: _parse_tuple}[typ]
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        # SUPPRESS: an option not given stays absent (config_from_args reads getattr(args, name,
        # None)), and --help shows the real default, the preset's value, instead of "None".
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=conv,
                           default=argparse.SUPPRESS, metavar=typ.__name__.upper(),
                           help=f"default: the preset's (the paper's: {shown})")


def config_from_args(cls, preset: str, args: argparse.Namespace, stage: str):
    """The preset's config with every explicitly given ``--field`` applied, validated."""
    config = get_preset(preset, stage)
    overrides = {f.name: getattr(args, f.name) for f in fields(cls)
                 if getattr(args, f.name, None) is not None}
    return replace(config, **overrides).validate()


def to_dict(config) -> dict:
    items = dataclasses.asdict(config).items()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def save_run_config(path: Path, **sections) -> None:
    """Write the resolved configuration (dataclasses or plain dicts) as JSON."""
    payload = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in sections.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def config_from_dict(cls, data: dict):
    """Rebuild a config from its JSON form; unknown fields are a clear error, not ignored."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values).validate()
