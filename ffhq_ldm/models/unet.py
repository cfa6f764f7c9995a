"""Stage-2 denoiser: an ADM-style UNet2DModel, and the LDM noise schedule."""

from __future__ import annotations

import numpy as np
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from ..config import UNetConfig


def attention_levels(config: UNetConfig, latent_size: int) -> list[bool]:
    """Which resolution levels get self-attention: level i runs at latent_size / 2**i."""
    return [latent_size // 2 ** i in config.attention_resolutions
            for i in range(len(config.block_out_channels))]


def build_unet(config: UNetConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    """The UNet of docs/design.md (UNet) for latents of shape (latent_channels, size, size).

    The paper's preset on 32x32 latents gives block types Attn x3 + plain on the way down,
    the mirror on the way up, and attention in the middle block: about 190 M parameters.
    """
    levels = attention_levels(config, latent_size)
    if latent_size % 2 ** (len(levels) - 1):
        raise ValueError(f"latent size {latent_size} cannot be downsampled {len(levels) - 1} times")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels))
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=config.attention_head_dim,
        add_attention=config.mid_attention,
        norm_num_groups=config.norm_num_groups,
        # Without this, diffusers drops the GroupNorm of the mid attention under scale_shift.
        attn_norm_num_groups=config.norm_num_groups,
        resnet_time_scale_shift=config.resnet_time_scale_shift,
        dropout=config.dropout,
        flip_sin_to_cos=True,  # ADM's timestep embedding: [cos, sin]
        freq_shift=0,
    )


def schedule_betas(config: UNetConfig) -> np.ndarray | None:
    """The betas in float64, for the schedules we can compute exactly.

    LDM's "linear" schedule is linear in sqrt(beta): betas = linspace(sqrt(b0), sqrt(b1), T)**2.
    diffusers evaluates it in float32 (errors up to 3e-9); computing it in float64 and handing
    the result over as ``trained_betas`` keeps each beta within float32 rounding (< 1e-9).
    None means "let diffusers compute it" (the cosine schedule).
    """
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.beta_schedule == "scaled_linear":
        return np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float64) ** 2
    if config.beta_schedule == "linear":
        return np.linspace(b0, b1, T, dtype=np.float64)
    return None


def _schedule_kwargs(config: UNetConfig) -> dict:
    betas = schedule_betas(config)
    return dict(
        trained_betas=None if betas is None else betas.tolist(),
        num_train_timesteps=config.num_train_timesteps,
        # diffusers' name for the cosine schedule of improved DDPM
        beta_schedule={"cosine": "squaredcos_cap_v2"}.get(config.beta_schedule,
                                                          config.beta_schedule),
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_zero_terminal_snr,
        clip_sample=False,  # latents are not bounded to [-1, 1]; clipping ruins them
    )


def build_train_scheduler(config: UNetConfig) -> DDPMScheduler:
    """The forward process used for training (and DDPM sampling)."""
    return DDPMScheduler(**_schedule_kwargs(config), variance_type="fixed_small")


def build_sample_scheduler(config: UNetConfig) -> DDIMScheduler:
    """DDIM with LDM's settings: the pipeline's default sampler."""
    kwargs = _schedule_kwargs(config)
    if config.rescale_zero_terminal_snr:
        # Lin et al. 2024: with zero terminal SNR, sample from the last timestep.
        extra = dict(set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing")
    else:
        extra = dict(set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return DDIMScheduler(**kwargs, **extra)
