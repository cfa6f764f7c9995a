"""The stage-1 training step (``train.steps.AutoencoderTrainStep``) against LDM's formula.

The step computes the adaptive GAN weight without LDM's second pass through LPIPS and the
discriminator (gradients with respect to x̂ once, chained through the decoder's last layer).
The reference here is written out again from the formula, the way LDM's code evaluates it:
the loss built on one graph, λ from two ``autograd.grad`` calls on the last layer, then
``loss.backward()``; the discriminator's hinge loss backward on its own. The step must give
the same loss, λ, autoencoder gradients and discriminator gradients, for KL and VQ, before and
after ``disc_start``, eager and compiled (``aot_eager``: dynamo and AOT autograd on a CPU).

LPIPS is the random-trunk one (offline; not the LPIPS metric, see test_autoencoder_loss.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ffhq_ldm.config import get_preset
from ffhq_ldm.losses.autoencoder import AutoencoderLoss
from ffhq_ldm.losses.perceptual import build_perceptual
from ffhq_ldm.models.discriminator import PatchDiscriminator
from ffhq_ldm.models.vae import Reconstructor, build_vae
from ffhq_ldm.train.steps import AutoencoderTrainStep

DISC_START = 3


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(1234)
    return build_perceptual("lpips-vgg-random-trunk")


class Capture:
    """An optimiser that records the gradients it is asked to apply and changes nothing."""

    def __init__(self, params):
        self.params = list(params)
        self.grads = None

    def step(self):
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _config(kind: str):
    return replace(get_preset("tiny", "vae"), autoencoder=kind, disc_start=DISC_START,
                   disc_weight=0.8, kl_weight=1e-3, codebook_weight=1.5, perceptual_weight=0.7)


def _models(cfg, seed: int = 0):
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers)  # BatchNorm, as trained
    return vae, disc


def _images(n: int = 2, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False)


def _kl(mean, logvar):
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    return torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()


def ldm_reference(cfg, vae, disc, lpips, x, step: int, noise_seed: int):
    """LDM's generator and discriminator losses and gradients, written from the formula:
    λ = disc_weight · clamp(‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), 0, 1e4) by two autograd.grad calls."""
    torch.manual_seed(noise_seed)  # the posterior sample
    x_hat, mean, logvar, vq = Reconstructor(vae)(x)
    per_pixel = (x - x_hat).abs() + cfg.perceptual_weight * lpips(x, x_hat)
    if cfg.autoencoder == "kl":
        loss = per_pixel.flatten(1).sum(1).mean()
        nll = loss
        loss = loss + cfg.kl_weight * _kl(mean, logvar)
    else:
        nll = per_pixel.mean()
        loss = nll + cfg.codebook_weight * vq.mean()
    out = {"weight": None}
    if step >= cfg.disc_start:
        g = -disc(x_hat).mean()
        last = vae.decoder.conv_out.weight
        a = torch.autograd.grad(nll, last, retain_graph=True)[0]
        b = torch.autograd.grad(g, last, retain_graph=True)[0]
        weight = cfg.disc_weight * (a.norm() / (b.norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = loss + weight * g
        out["weight"] = weight
    loss.backward()
    out["loss"] = loss.detach()
    out["vae_grads"] = [None if p.grad is None else p.grad.clone() for p in vae.parameters()]
    disc.zero_grad(set_to_none=True)  # D learns from its own loss only
    if step >= cfg.disc_start:
        d_loss = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat.detach())).mean())
        d_loss.backward()
        out["d_loss"] = d_loss.detach()
    out["disc_grads"] = [None if p.grad is None else p.grad.clone() for p in disc.parameters()]
    out["disc_buffers"] = [b.clone() for b in disc.buffers()]
    return out


def run_step(cfg, vae, disc, lpips, x, step: int, noise_seed: int, **options):
    recon = Reconstructor(vae)
    loss_fn = AutoencoderLoss(cfg, lpips, disc)
    opt_g, opt_d = Capture(vae.parameters()), Capture(disc.parameters())
    train_step = AutoencoderTrainStep(recon, loss_fn, opt_g, opt_d,
                                      last_layer=vae.decoder.conv_out, **options)
    torch.manual_seed(noise_seed)
    result = train_step(x, step)
    return result, opt_g.grads, opt_d.grads, [b.clone() for b in disc.buffers()], train_step


def _assert_grads_close(got, expected, what):
    """Each gradient to rtol 1e-4, plus an atol of 1e-6 of the largest gradient entry overall
    (some gradients are zero in exact arithmetic, e.g. attention's key bias, and float noise
    in practice)."""
    assert len(got) == len(expected)
    scale = max(e.abs().max().item() for e in expected if e is not None)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if e is None:
            assert g is None, f"{what} {i}"
            continue
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6 * scale, msg=f"{what} {i}")


def _check(kind, lpips, step, **options):
    cfg = _config(kind)
    x = _images()
    vae, disc = _models(cfg)
    ref = ldm_reference(cfg, vae, disc, lpips, x, step, noise_seed=11)
    vae, disc = _models(cfg)  # the same initial weights and BatchNorm statistics
    result, g_grads, d_grads, buffers, _ = run_step(cfg, vae, disc, lpips, x, step, 11,
                                                    **options)
    assert result.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-5)
    _assert_grads_close(g_grads, ref["vae_grads"], "autoencoder gradient")
    if ref["weight"] is None:
        assert "disc/adaptive_weight" not in result.logs and d_grads is None
        return result
    weight = result.logs["disc/adaptive_weight"].item()
    assert weight == pytest.approx(ref["weight"].item(), rel=1e-5)
    assert 1e-3 < weight / cfg.disc_weight < 1e4, "inside the clamp: the ratio itself is tested"
    # the adversarial term changes the total enough that a wrong λ would show
    assert abs(weight * result.logs["loss/g_adv"].item()) > 1e-3 * abs(ref["loss"].item())
    assert result.logs["loss/disc"].item() == pytest.approx(ref["d_loss"].item(), rel=1e-5)
    _assert_grads_close(d_grads, ref["disc_grads"], "discriminator gradient")
    for b, e in zip(buffers, ref["disc_buffers"], strict=True):  # BatchNorm running statistics
        torch.testing.assert_close(b, e)
    return result


@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("step", [DISC_START - 1, DISC_START, DISC_START + 5])
def test_step_equals_the_ldm_formula(kind, step, lpips_random):
    _check(kind, lpips_random, step)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_ldm_reference_mode_equals_the_formula_too(kind, lpips_random):
    """The eager baseline the bench times (``ldm_reference=True``) is the same formula."""
    _check(kind, lpips_random, DISC_START, ldm_reference=True)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_compiled_step_equals_the_ldm_formula(kind, lpips_random):
    import torch._dynamo

    torch._dynamo.reset()
    _check(kind, lpips_random, DISC_START, compile=True, compile_backend="aot_eager")
    torch._dynamo.reset()


def test_decoder_last_layer_split_is_the_decoder(lpips_random):
    """x̂ = conv_out(h) with h from ``Reconstructor(..., last_layer=False)``, bit for bit."""
    for kind in ("kl", "vq"):
        vae, _ = _models(_config(kind), seed=5)
        recon, x = Reconstructor(vae), _images(seed=4)
        torch.manual_seed(2)
        full = recon(x)
        torch.manual_seed(2)
        split = recon(x, last_layer=False)
        assert torch.equal(vae.decoder.conv_out(split[0]), full[0])
        for a, b in zip(full[1:], split[1:], strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
