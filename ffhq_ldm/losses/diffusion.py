"""The DDPM training objective on latents (Ho et al. 2020, "simple" loss), with options.

For clean latents z, noise ε and timestep t, with ᾱ_t the cumulative product of (1 − β):
    z_t = sqrt(ᾱ_t) z + sqrt(1 − ᾱ_t) ε                        (forward process, closed form)
    target = ε (epsilon, the paper) or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) z (Salimans & Ho 2022)
    loss = mean_b w_b · mean_{c,h,w} (model(z_t, t) − target)²
with w = 1, or min-SNR-γ (Hang et al. 2023): SNR = ᾱ/(1 − ᾱ), w = min(SNR, γ)/SNR for ε and
min(SNR, γ)/(SNR + 1) for v.
"""

from __future__ import annotations

import torch

from ..config import mix_seed


def add_noise(z: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(z.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * z.float() + (1 - a).sqrt() * noise.float()).to(z.dtype)


def v_target(z: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(z.device)[timesteps].float().view(-1, 1, 1, 1)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * z.float()).to(z.dtype)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].double()
    snr = a / (1 - a)
    if prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) / (snr + 1)).float()
    # min(SNR, γ)/SNR written as min(1, γ/SNR): the same number wherever SNR > 0, and its limit
    # 1 (not 0/0 = NaN) at SNR = 0, which a zero-terminal-SNR schedule has at its last step.
    return (gamma / snr).clamp(max=1.0).float()


class DiffusionLoss:
    """Callable ``(model, z, noise, timesteps) -> (loss, logs)``."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 snr_gamma: float = 0.0):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma

    def to(self, device) -> DiffusionLoss:
        self.alphas_cumprod = self.alphas_cumprod.to(device)
        return self

    def __call__(self, model, z: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
        noisy = add_noise(z, noise, self.alphas_cumprod, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = v_target(z, noise, self.alphas_cumprod, timesteps)
        prediction = model(noisy, timesteps).sample
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        mse = per_sample.mean()
        if self.snr_gamma > 0:
            weights = min_snr_weights(self.alphas_cumprod, timesteps, self.snr_gamma,
                                      self.prediction_type)
            loss = (weights * per_sample).mean()
        else:
            loss = mse
        return loss, {"loss/mse": mse.detach()}


def draw_global_batch(seed: int, step: int, global_batch: int, num_entries: int,
                      latent_shape: tuple, num_timesteps: int, device="cpu") -> dict:
    """Everything random about one optimizer step, for the whole global batch at once.

    It depends only on (seed, step): each process and each accumulation round then takes its
    own slice, so a run gives the same result whatever its process layout (2 processes, or 1
    process with 2 accumulation rounds, see ``slice_for``).
    """
    g = torch.Generator(device=device).manual_seed(mix_seed(seed, step))
    shape = (global_batch, *latent_shape)
    return {
        "indices": torch.randint(0, num_entries, (global_batch,), generator=g, device=device),
        "timesteps": torch.randint(0, num_timesteps, (global_batch,), generator=g, device=device),
        "latent_noise": torch.randn(shape, generator=g, device=device),
        "noise": torch.randn(shape, generator=g, device=device),
    }


def slice_for(batch: dict, micro_batch: int, accumulation_round: int, rank: int,
              num_processes: int) -> dict:
    """The part of a global batch that one process handles in one accumulation round."""
    start = (accumulation_round * num_processes + rank) * micro_batch
    return {k: v[start:start + micro_batch] for k, v in batch.items()}
