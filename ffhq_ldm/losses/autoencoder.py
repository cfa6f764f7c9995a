"""The autoencoder's loss, as LDM (taming's LPIPSWithDiscriminator) defines it.

Generator (autoencoder) side, per image:
    rec  = |x - x̂| + w_p · LPIPS(x, x̂)             (LPIPS with gradients)
    KL:  nll = sum over pixels of rec;  loss = nll + kl_weight · KL(q(z|x) || N(0, I))
    VQ:  nll = mean of rec;             loss = nll + codebook_weight · (codebook + commitment)
    + λ · disc_factor · (−mean D(x̂)),
    λ = disc_weight · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4)   (Esser et al. 2021, Eq. 7)
where L is the decoder's last layer and λ is detached. The KL branch sums over pixels (LDM),
which is what makes kl_weight = 1e-6 the right size; the VQ branch averages (taming).
Discriminator side: hinge loss 0.5 · (mean relu(1 − D(x)) + mean relu(1 + D(x̂))).
Both adversarial terms are off until ``disc_start``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims, one value per image."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped and detached (Esser et al. 2021, eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Callable pieces of the stage-1 loss; each returns ``(loss, logs)``."""

    def __init__(self, config: VAEConfig, perceptual: nn.Module | None, discriminator: nn.Module):
        super().__init__()
        self.config = config
        self.perceptual = perceptual
        self.discriminator = discriminator

    def disc_active(self, step: int) -> bool:
        return step >= self.config.disc_start

    def reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor,
                       perceptual: nn.Module | None = None) -> torch.Tensor:
        """Per-pixel |x − x̂| + w_p · LPIPS, shape (N, C, H, W) (LPIPS broadcast per image).
        ``perceptual``: what to call for LPIPS (e.g. a compiled one); default self.perceptual."""
        rec = (x - x_hat).abs()
        if self.perceptual is not None and self.config.perceptual_weight > 0:
            perceptual = self.perceptual if perceptual is None else perceptual
            # LPIPS runs in fp32 even under autocast: its per-layer unit normalisation is
            # sensitive, and it is ~5% of the step's FLOPs.
            with torch.autocast(device_type=x.device.type, enabled=False):
                p = perceptual(x.float(), x_hat.float())
            rec = rec + self.config.perceptual_weight * p
        return rec

    def nll(self, x, x_hat, kl: bool, perceptual: nn.Module | None = None):
        """The reconstruction term ``(nll, logs)``: summed over pixels for KL, averaged for VQ."""
        x_hat = x_hat.float()
        rec = self.reconstruction(x.float(), x_hat, perceptual)
        nll = rec.flatten(1).sum(1).mean() if kl else rec.mean()
        logs = {"loss/l1": (x - x_hat).abs().mean().detach(), "loss/rec": rec.mean().detach(),
                "loss/nll": nll.detach()}
        return nll, logs

    def regularizer(self, posterior: tuple[torch.Tensor, torch.Tensor] | None,
                    vq_loss: torch.Tensor | None):
        """``(weight · term, logs)``: kl_weight · KL for KL (posterior = (mean, logvar)),
        codebook_weight · (codebook + commitment) for VQ."""
        if posterior is not None:
            reg = kl_to_standard_normal(posterior[0].float(), posterior[1].float()).mean()
            return self.config.kl_weight * reg, {"loss/kl": reg.detach()}
        reg = vq_loss.float().mean()
        return self.config.codebook_weight * reg, {"loss/vq": reg.detach()}

    def generator_loss(self, x, x_hat, step: int, last_layer: torch.Tensor,
                       posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
                       vq_loss: torch.Tensor | None = None):
        """The autoencoder's loss. ``posterior`` = (mean, logvar) for KL; ``vq_loss`` for VQ.

        The adaptive weight as LDM computes it: two ``autograd.grad`` calls through LPIPS and
        the discriminator, before the caller's backward goes through them again.
        ``AutoencoderTrainStep`` computes the same loss and gradients with one pass each."""
        nll, logs = self.nll(x, x_hat, kl=posterior is not None)
        reg, reg_logs = self.regularizer(posterior, vq_loss)
        loss = nll + reg
        logs.update(reg_logs)

        if self.disc_active(step):
            self.discriminator.requires_grad_(False)  # its grads come from its own step only
            logits_fake = self.discriminator(x_hat.float())
            self.discriminator.requires_grad_(True)
            g_loss = -logits_fake.float().mean()
            weight = self.config.disc_weight * adaptive_weight(nll, g_loss, last_layer)
            loss = loss + weight * g_loss
            logs.update({"loss/g_adv": g_loss.detach(), "disc/adaptive_weight": weight})
        logs["loss/total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x, x_hat, step: int, discriminator: nn.Module | None = None):
        """Hinge loss on real vs reconstructed images; zero (and no graph) before disc_start.
        ``discriminator``: what to call (e.g. a compiled one); default ``self.discriminator``."""
        if not self.disc_active(step):
            zero = x.new_zeros(())
            return zero, {}
        disc = self.discriminator if discriminator is None else discriminator
        logits_real = disc(x.detach()).float()
        logits_fake = disc(x_hat.detach()).float()
        loss = hinge_d_loss(logits_real, logits_fake)
        logs = {"loss/disc": loss.detach(), "disc/logits_real": logits_real.mean().detach(),
                "disc/logits_fake": logits_fake.mean().detach()}
        return loss, logs
