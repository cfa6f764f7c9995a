"""Tests for the stage-1 loss (ffhq_ldm.losses.autoencoder) and the LPIPS builder (perceptual).

Every expected value is computed here independently of the code under test: gradient norms on
fresh autograd graphs, hinge and KL numbers worked out by hand or by torch.distributions, and
the loss formulas of docs/design.md (Autoencoder loss) written out again.

LPIPS here is ``build_perceptual("lpips-vgg-random-trunk")``: the lpips wheel's linear heads on
a *randomly initialised* VGG trunk, built offline. It is a smooth, gradient-carrying image
distance, not the LPIPS metric; the real trunk cannot be downloaded in tests (docs/design.md,
Offline weights), so trunk loading is tested with a fake trunk file of torchvision's layout.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, VQModel
from torch import nn

from ffhq_ldm.config import get_preset
from ffhq_ldm.losses.autoencoder import (
    AutoencoderLoss,
    adaptive_weight,
    hinge_d_loss,
    kl_to_standard_normal,
)
from ffhq_ldm.losses.perceptual import TRUNK_FILES, PerceptualWeightsError, build_perceptual
from ffhq_ldm.models.discriminator import PatchDiscriminator
from ffhq_ldm.models.vae import Reconstructor, build_vae, decoder_last_layer

# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny", "vae")


@pytest.fixture(scope="module")
def lpips_random():
    """LPIPS with a random VGG trunk (offline; NOT the real metric, see module docstring)."""
    torch.manual_seed(1234)
    return build_perceptual("lpips-vgg-random-trunk")


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth images in [-1, 1] (upsampled low-res noise): something an autoencoder can learn."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False)


def _tiny_models(cfg, seed: int = 0, norm: str = "batch"):
    torch.manual_seed(seed)
    vae = build_vae(cfg)
    disc = PatchDiscriminator(3, cfg.disc_channels, cfg.disc_layers, norm=norm)
    return vae, Reconstructor(vae), disc


def _kl_closed_form(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, 1)) per image via torch.distributions (not the code's formula)."""
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(q.loc), torch.ones_like(q.scale))
    return torch.distributions.kl_divergence(q, p).flatten(1).sum(1)


def _grad_norm_on_fresh_graph(loss_of_fresh_forward, param: torch.Tensor, *modules) -> float:
    """‖∂loss/∂param‖, by .backward() on a graph built only for this call."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    loss_of_fresh_forward().backward()
    norm = param.grad.double().norm().item()
    for m in modules:
        m.zero_grad(set_to_none=True)
    return norm


# ---------------------------------------------------------------------------------------------
# adaptive weight
# ---------------------------------------------------------------------------------------------

def test_adaptive_weight_equals_ratio_of_gradient_norms(cfg):
    vae, rec, disc = _tiny_models(cfg, norm="group")
    last = decoder_last_layer(vae)
    assert last is vae.decoder.conv_out.weight  # LDM: the decoder's last conv
    x = _images(2)

    def nll_of(x_hat):
        return (x - x_hat).abs().flatten(1).sum(1).mean()

    def g_of(x_hat):
        return -disc(x_hat).mean()

    x_hat = rec(x, sample_posterior=False)[0]
    weight = adaptive_weight(nll_of(x_hat), g_of(x_hat), last)

    n_nll = _grad_norm_on_fresh_graph(lambda: nll_of(rec(x, sample_posterior=False)[0]), last,
                                      vae, disc)
    n_g = _grad_norm_on_fresh_graph(lambda: g_of(rec(x, sample_posterior=False)[0]), last,
                                    vae, disc)
    expected = n_nll / (n_g + 1e-4)
    assert 0 < expected < 1e4, "pick a case inside the clamp range so the ratio itself is tested"
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert weight.grad_fn is None and not weight.requires_grad


def test_adaptive_weight_is_clamped_and_detached():
    # by hand: with L of 4 entries, ∇(a·ΣL) has norm 2|a|. a = 0.5, b = 5e-5 gives
    # 1 / (1e-4 + 1e-4) = 5000: the 1e-4 in the denominator halves the weight here.
    L4 = nn.Parameter(torch.ones(4))
    mid = adaptive_weight(0.5 * L4.sum(), 5e-5 * L4.sum(), L4)
    assert mid.item() == pytest.approx(5000, rel=1e-5)

    L = nn.Parameter(torch.ones(3))
    # ‖∇nll‖ = 2e3·√3 and ‖∇g‖ = 1e-9·√3: the raw ratio ~3.5e7 is above the 1e4 cap.
    high = adaptive_weight(1e3 * (L ** 2).sum(), 1e-9 * L.sum(), L)
    assert high.item() == 1e4
    assert high.grad_fn is None and not high.requires_grad
    # a gradient-free reconstruction term gives weight 0 (the lower end of [0, 1e4])
    low = adaptive_weight(0.0 * L.sum(), L.sum(), L)
    assert low.item() == 0.0
    # the cap is the max_weight argument
    assert adaptive_weight(1e3 * (L ** 2).sum(), 1e-9 * L.sum(), L, max_weight=7.0).item() == 7.0


# ---------------------------------------------------------------------------------------------
# hinge and KL terms
# ---------------------------------------------------------------------------------------------

class _Scale(nn.Module):
    """D(v) = s·v with one parameter s = 1: the logits are the inputs themselves."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, v):
        return self.s * v


def test_hinge_loss_hand_values(cfg):
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> mean 2.5/3;  relu(1 + fake) = [0, 1.3, 2] -> mean 3.3/3
    # 0.5 * (2.5/3 + 3.3/3) = 29/30
    assert hinge_d_loss(real, fake).item() == pytest.approx(29 / 30, rel=1e-6)
    # perfectly separated logits (|D| >= 1 on the right side) cost nothing
    assert hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0

    # Through discriminator_loss with D(v) = s·v: same value, and by hand
    # d/ds = 0.5 * ((-0.5 + 1)/3 + (0.3 + 1)/3) = 0.5 * 1.8/3 = 0.3 (only active hinges count).
    disc = _Scale()
    loss_fn = AutoencoderLoss(replace(cfg, disc_start=0), None, disc)
    loss, logs = loss_fn.discriminator_loss(real, fake, step=0)
    assert loss.item() == pytest.approx(29 / 30, rel=1e-6)
    loss.backward()
    assert disc.s.grad.item() == pytest.approx(0.3, rel=1e-6)
    assert logs["disc/logits_real"].item() == pytest.approx(0.5)
    assert logs["disc/logits_fake"].item() == pytest.approx(-0.7 / 3)


def test_kl_matches_closed_form():
    mean = torch.tensor([[1.0, -2.0, 0.0, 0.5]])
    logvar = torch.tensor([[0.0, math.log(4.0), 0.0, -1.0]])
    # 0.5 (μ² + σ² − 1 − log σ²) per dimension, summed:
    hand = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (4 + 4 - 1 - math.log(4)) + 0.0 \
        + 0.5 * (0.25 + math.exp(-1) - 1 + 1)
    assert kl_to_standard_normal(mean, logvar).item() == pytest.approx(hand, rel=1e-6)

    g = torch.Generator().manual_seed(3)
    mean = torch.randn(3, 4, 5, 5, generator=g)
    logvar = torch.randn(3, 4, 5, 5, generator=g)
    got = kl_to_standard_normal(mean, logvar)
    assert got.shape == (3,)
    torch.testing.assert_close(got.double(), _kl_closed_form(mean, logvar), rtol=1e-5, atol=1e-4)


def test_generator_loss_kl_and_vq_formulas(cfg, lpips_random):
    """KL: sum_pixels(|x−x̂| + w·LPIPS)/N + kl_weight·KL;  VQ: mean(|x−x̂| + w·LPIPS) + c·vq."""
    c = replace(cfg, perceptual_weight=0.7, kl_weight=0.1, codebook_weight=2.0)
    loss_fn = AutoencoderLoss(c, lpips_random, PatchDiscriminator(3, 8, 2))
    g = torch.Generator().manual_seed(5)
    x = _images(2, seed=1)
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mean = torch.randn(2, 4, 16, 16, generator=g)
    logvar = 0.5 * torch.randn(2, 4, 16, 16, generator=g)
    vq = torch.tensor(0.37)

    with torch.no_grad():
        lp = lpips_random(x, x_hat).view(2).double()
    l1 = (x - x_hat).abs().double()
    pixels = 3 * 32 * 32
    per_image = l1.sum((1, 2, 3)) + 0.7 * lp * pixels  # LPIPS counted once per pixel (LDM)
    expected_kl = per_image.mean() + 0.1 * _kl_closed_form(mean, logvar).mean()

    loss, logs = loss_fn.generator_loss(x, x_hat, step=0, last_layer=None,
                                        posterior=(mean, logvar))
    assert loss.item() == pytest.approx(expected_kl.item(), rel=1e-5)
    assert logs["loss/l1"].item() == pytest.approx(l1.mean().item(), rel=1e-5)

    expected_vq = l1.mean() + 0.7 * lp.mean() + 2.0 * 0.37
    loss, logs = loss_fn.generator_loss(x, x_hat, step=0, last_layer=None, vq_loss=vq)
    assert loss.item() == pytest.approx(expected_vq.item(), rel=1e-5)
    assert logs["loss/vq"].item() == pytest.approx(0.37)


# ---------------------------------------------------------------------------------------------
# the discriminator switch at disc_start
# ---------------------------------------------------------------------------------------------

def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_no_adversarial_terms_before_disc_start(cfg):
    c = replace(cfg, disc_start=3)
    vae, rec, disc = _tiny_models(c)
    calls = _count_calls(disc)
    loss_fn = AutoencoderLoss(c, None, disc)
    x = _images(2)
    for step in (0, 2):  # 2 = disc_start - 1, the last step without the discriminator
        vae.zero_grad(set_to_none=True)
        x_hat, mean, logvar, _ = rec(x, sample_posterior=False)
        loss, logs = loss_fn.generator_loss(x, x_hat, step, decoder_last_layer(vae),
                                            posterior=(mean, logvar))
        assert "loss/g_adv" not in logs and "disc/adaptive_weight" not in logs
        # total = nll + kl_weight·KL, bit for bit (the same float32 operations)
        assert loss.item() == (logs["loss/nll"] + c.kl_weight * logs["loss/kl"]).item()
        # ... and that is the formula, computed independently
        hand = (x - x_hat).abs().flatten(1).sum(1).mean().double() \
            + c.kl_weight * _kl_closed_form(mean, logvar).mean()
        assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
        loss.backward()
        assert vae.decoder.conv_out.weight.grad is not None
        assert all(p.grad is None for p in disc.parameters())

        d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step)
        assert d_loss.item() == 0.0 and d_logs == {}
        assert d_loss.grad_fn is None and not d_loss.requires_grad
    assert not calls, "the discriminator must not even run before disc_start"


@pytest.mark.parametrize("offset", [0, 7])  # exactly at disc_start, and later
def test_adversarial_terms_from_disc_start(cfg, offset):
    c = replace(cfg, disc_start=3, disc_weight=0.5, kl_weight=1e-3)
    vae, rec, disc = _tiny_models(c, seed=1)  # PatchGAN with BatchNorm, as trained
    loss_fn = AutoencoderLoss(c, None, disc)
    last = decoder_last_layer(vae)
    x = _images(2, seed=2)
    step = c.disc_start + offset

    def nll_of(x_hat):
        return (x - x_hat).abs().flatten(1).sum(1).mean()

    # λ by hand, on fresh graphs (BatchNorm in train mode: D's output depends on its batch only)
    n_nll = _grad_norm_on_fresh_graph(lambda: nll_of(rec(x, sample_posterior=False)[0]), last,
                                      vae, disc)
    n_g = _grad_norm_on_fresh_graph(lambda: -disc(rec(x, sample_posterior=False)[0]).mean(),
                                    last, vae, disc)
    lam = min(max(n_nll / (n_g + 1e-4), 0.0), 1e4)

    x_hat, mean, logvar, _ = rec(x, sample_posterior=False)
    with torch.no_grad():
        g_adv = -disc(x_hat).mean().item()
        d_real, d_fake = disc(x), disc(x_hat)
    hand_total = nll_of(x_hat).item() + c.kl_weight * _kl_closed_form(mean, logvar).mean().item() \
        + c.disc_weight * lam * g_adv

    loss, logs = loss_fn.generator_loss(x, x_hat, step, last, posterior=(mean, logvar))
    assert logs["loss/g_adv"].item() == pytest.approx(g_adv, rel=1e-5)
    assert logs["disc/adaptive_weight"].item() == pytest.approx(c.disc_weight * lam, rel=1e-5)
    assert loss.item() == pytest.approx(hand_total, rel=1e-5)
    assert abs(c.disc_weight * lam * g_adv) > 1e-4 * abs(hand_total), "adversarial term too small"

    loss.backward()
    assert all(p.requires_grad for p in disc.parameters()), "D must be trainable again afterwards"
    assert all(p.grad is None for p in disc.parameters()), "the generator step must not train D"
    vae_grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    assert "decoder.conv_out.weight" in vae_grads

    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step)
    hand_d = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
    assert d_loss.item() == pytest.approx(hand_d.item(), rel=1e-5)
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert sum(p.grad.abs().sum().item() for p in disc.parameters()) > 0
    # x̂ is detached inside discriminator_loss: the autoencoder's gradients are unchanged
    for n, p in vae.named_parameters():
        if n in vae_grads:
            assert torch.equal(p.grad, vae_grads[n]), n
        else:
            assert p.grad is None, n


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

def test_lpips_term_sends_gradients_to_the_decoder(cfg, lpips_random):
    """Uses the random-trunk LPIPS (offline, not the real metric)."""
    vae, rec, disc = _tiny_models(cfg)
    x = _images(2)
    x_hat = rec(x, sample_posterior=False)[0]
    with_p = AutoencoderLoss(cfg, lpips_random, disc).reconstruction(x, x_hat).sum()
    without = AutoencoderLoss(cfg, None, disc).reconstruction(x, x_hat).sum()
    decoder_params = list(vae.decoder.parameters())
    # the difference is exactly w·Σ LPIPS: its gradient is the LPIPS term's alone
    grads = torch.autograd.grad(with_p - without, decoder_params, allow_unused=True)
    assert grads[-1] is not None  # conv_out.bias, the very last parameter
    total = sum(g.double().norm() ** 2 for g in grads if g is not None) ** 0.5
    assert total.item() > 0
    last_idx = next(i for i, p in enumerate(decoder_params) if p is vae.decoder.conv_out.weight)
    assert grads[last_idx].abs().sum().item() > 0
    # LPIPS itself is frozen
    assert not any(p.requires_grad for p in lpips_random.parameters())
    assert not lpips_random.training


@pytest.fixture(scope="module")
def fake_vgg_trunk(tmp_path_factory):
    """A trunk file in torchvision's layout (keys "features.N.weight"), random weights."""
    from torchvision.models import vgg

    torch.manual_seed(99)
    # torchvision builds vgg16(weights=None).features as exactly this (VGG(make_layers(cfgs["D"])));
    # calling it directly skips the 120 M-parameter classifier we would throw away.
    features = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)
    assert len(features) == 31  # conv/relu/pool layers 0..30, as in vgg16().features
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    path = tmp_path_factory.mktemp("trunk") / TRUNK_FILES["vgg"]
    torch.save(state, path)
    return path, state


def test_lpips_without_trunk_says_how_to_provide_it(tmp_path, monkeypatch):
    empty = tmp_path / "torch_home"
    empty.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(empty))
    with pytest.raises(PerceptualWeightsError) as info:
        build_perceptual("lpips-vgg")
    msg = str(info.value)
    assert TRUNK_FILES["vgg"] in msg  # which file
    assert str(empty) in msg  # where it looked
    assert "--lpips-trunk" in msg  # how to pass it
    assert "lpips-vgg-random-trunk" in msg  # the offline alternative


def test_lpips_missing_given_trunk_names_that_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    wrong = tmp_path / "typo" / TRUNK_FILES["vgg"]
    with pytest.raises(PerceptualWeightsError, match="--lpips-trunk") as info:
        build_perceptual("lpips-vgg", trunk_path=wrong)
    assert str(wrong) in str(info.value)


def test_lpips_rejects_a_trunk_file_of_the_wrong_shape(fake_vgg_trunk, tmp_path):
    _, state = fake_vgg_trunk
    bad = dict(state)
    bad["features.0.weight"] = torch.zeros(64, 3, 5, 5)  # right name, wrong shape
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(PerceptualWeightsError, match="does not look like"):
        build_perceptual("lpips-vgg", trunk_path=path)


def _assert_trunk_equals(model, state):
    trunk = model.net.state_dict()
    assert len(trunk) == 26  # 13 convolutions, weight + bias each
    for name, tensor in trunk.items():
        _slice, index, kind = name.split(".")
        assert torch.equal(tensor, state[f"features.{index}.{kind}"]), name


def test_lpips_loads_trunk_file(fake_vgg_trunk, tmp_path, monkeypatch):
    path, state = fake_vgg_trunk
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing_here"))
    model = build_perceptual("lpips-vgg", trunk_path=path)
    _assert_trunk_equals(model, state)
    assert not any(p.requires_grad for p in model.parameters())


def test_lpips_finds_trunk_in_torch_hub_cache(fake_vgg_trunk, tmp_path, monkeypatch):
    """Where torchvision's download puts it: $XDG_CACHE_HOME/torch/hub/checkpoints if
    TORCH_HOME is unset (torch.hub.get_dir())."""
    path, state = fake_vgg_trunk
    hub = tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / TRUNK_FILES["vgg"]).write_bytes(path.read_bytes())
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = build_perceptual("lpips-vgg")
    _assert_trunk_equals(model, state)


# ---------------------------------------------------------------------------------------------
# a few optimisation steps, KL and VQ
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_few_adam_steps_reduce_the_loss(cfg, lpips_random, kind):
    """KL with the full loss (random-trunk LPIPS, offline); VQ without LPIPS to save CPU time
    (its LPIPS term is the same code path, checked in test_generator_loss_kl_and_vq_formulas)."""
    c = replace(cfg, autoencoder=kind)
    vae, rec, disc = _tiny_models(c, seed=4)
    assert isinstance(vae, AutoencoderKL if kind == "kl" else VQModel)
    loss_fn = AutoencoderLoss(c, lpips_random if kind == "kl" else None, disc)
    last = decoder_last_layer(vae)
    opt = torch.optim.Adam(vae.parameters(), lr=c.learning_rate, betas=(0.5, 0.9))
    x = _images(2, seed=6)

    def loss_at(sample_posterior: bool):
        x_hat, mean, logvar, vq_loss = rec(x, sample_posterior=sample_posterior)
        if kind == "kl":
            assert vq_loss is None
        else:
            assert mean is None and vq_loss is not None
        return loss_fn.generator_loss(x, x_hat, 0, last,
                                      posterior=None if mean is None else (mean, logvar),
                                      vq_loss=vq_loss)[0]

    with torch.no_grad():
        before = loss_at(False).item()
    for _ in range(4):  # few steps: LPIPS (two VGG passes) dominates the CPU time
        loss = loss_at(True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(False).item()
    assert math.isfinite(after)
    assert after < 0.9 * before, (before, after)
