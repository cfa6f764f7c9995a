"""Tests for the DDPM objective (ffhq_ldm.losses.diffusion), the preset noise schedule, the EMA
(ffhq_ldm.train.ema.EMA) and the layout-independent batch drawing.

Expected values come from outside the code under test: the schedule is rebuilt here in float64
numpy from the formula (docs/design.md, Noise schedule), the forward process / v / min-SNR
formulas are written out again, diffusers' own DDPMScheduler is a second reference, and the EMA
is replayed by a plain loop.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ffhq_ldm.config import get_preset
from ffhq_ldm.losses.diffusion import (
    DiffusionLoss,
    add_noise,
    draw_global_batch,
    min_snr_weights,
    slice_for,
    v_target,
)
from ffhq_ldm.models.unet import build_train_scheduler
from ffhq_ldm.train.ema import EMA

T = 1000
F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


@pytest.fixture(scope="module")
def sched():
    return build_train_scheduler(get_preset("ffhq128-f4", "unet"))


def _ref_betas() -> np.ndarray:
    """LDM's "linear" schedule (docs/design.md, Noise schedule), in float64."""
    return np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), T, dtype=np.float64) ** 2


def _ref_alphas_cumprod() -> np.ndarray:
    return np.cumprod(1.0 - _ref_betas())


def _abar(t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t from the float64 reference, shaped to broadcast over (N, C, H, W)."""
    return torch.from_numpy(_ref_alphas_cumprod())[t].view(-1, 1, 1, 1)


def _latents(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g)


# timesteps from both ends of the schedule and between
TIMESTEPS = torch.tensor([0, 1, 137, 500, 998, 999])


# ---------------------------------------------------------------------------------------------
# schedule and forward process
# ---------------------------------------------------------------------------------------------

def test_preset_schedule_is_ldm_linear(sched):
    ref = _ref_betas()
    betas = sched.betas.numpy().astype(np.float64)
    assert betas.shape == (T,)
    assert sched.config.clip_sample is False  # latents are unbounded
    if sched.betas.dtype == torch.float64:
        np.testing.assert_allclose(betas, ref, rtol=0, atol=1e-9)
    else:
        # diffusers 0.42 computes betas in float32 (torch.linspace(..., float32) ** 2) and casts
        # even trained_betas to float32, so a float64 schedule cannot be built. Measured error vs
        # the float64 formula: 3.2e-9 absolute, 2.1e-7 relative (< 2 float32 ulp). 1e-9 is
        # unreachable at float32; check to 2.5 float32 eps relative instead, which still tells
        # scaled_linear from linear (2e-2 relative apart mid-schedule).
        assert sched.betas.dtype == torch.float32
        np.testing.assert_allclose(betas, ref, rtol=2.5 * F32_EPS, atol=0)
    # the end points the paper names
    assert betas[0] == pytest.approx(0.0015, rel=1e-6)
    assert betas[-1] == pytest.approx(0.0195, rel=1e-6)


def test_add_noise_matches_closed_form_and_diffusers(sched):
    z, eps = _latents()
    t = TIMESTEPS
    a = _abar(t)
    expected = a.sqrt() * z.double() + (1 - a).sqrt() * eps.double()
    got = add_noise(z, eps, sched.alphas_cumprod, t)
    assert got.dtype == z.dtype
    # float32 ᾱ (diffusers' cumprod) vs float64: ≤ 3e-7 in ᾱ, ≤ ~4e-6 here at t = 0
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, sched.add_noise(z, eps, t), rtol=0, atol=1e-6)
    # bf16 in, bf16 out (computed in fp32, rounded once)
    got_bf16 = add_noise(z.bfloat16(), eps.bfloat16(), sched.alphas_cumprod, t)
    assert got_bf16.dtype == torch.bfloat16
    expected_bf16 = a.sqrt() * z.bfloat16().double() + (1 - a).sqrt() * eps.bfloat16().double()
    torch.testing.assert_close(got_bf16.double(), expected_bf16, rtol=2 ** -7, atol=1e-5)


def test_v_target_matches_formula_and_diffusers(sched):
    z, eps = _latents(seed=1)
    t = TIMESTEPS
    a = _abar(t)
    expected = a.sqrt() * eps.double() - (1 - a).sqrt() * z.double()
    got = v_target(z, eps, sched.alphas_cumprod, t)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, sched.get_velocity(z, eps, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights(sched, gamma):
    t = torch.cat([torch.arange(0, T, 37), torch.tensor([T - 1])])
    a = _ref_alphas_cumprod()[t.numpy()]
    snr = a / (1 - a)
    assert (snr > gamma).any() and (snr < gamma).any(), "both sides of the clip must be tested"
    got_eps = min_snr_weights(sched.alphas_cumprod, t, gamma, "epsilon").double().numpy()
    got_v = min_snr_weights(sched.alphas_cumprod, t, gamma, "v_prediction").double().numpy()
    # ᾱ is float32 in the scheduler: SNR is off by up to ~7e-6 relative
    np.testing.assert_allclose(got_eps, np.minimum(snr, gamma) / snr, rtol=2e-5)
    np.testing.assert_allclose(got_v, np.minimum(snr, gamma) / (snr + 1), rtol=2e-5)
    # below γ the ε weight is exactly 1: plain MSE at the noisy end
    assert (got_eps[snr < gamma] == 1.0).all()


class _Stub(nn.Module):
    """A "UNet" that returns a known tensor and records what it was given."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls = []

    def forward(self, sample, timestep):
        self.calls.append((sample.clone(), timestep.clone()))
        return SimpleNamespace(sample=self.out)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_diffusion_loss_on_a_stub_model(sched, prediction_type, gamma):
    z, eps = _latents(seed=2)
    t = TIMESTEPS
    out = torch.randn(z.shape, generator=torch.Generator().manual_seed(9))
    model = _Stub(out)
    loss, logs = DiffusionLoss(sched.alphas_cumprod, prediction_type, gamma)(model, z, eps, t)

    a = _abar(t)
    (noisy, seen_t), = model.calls
    expected_noisy = a.sqrt() * z.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(noisy.double(), expected_noisy, rtol=0, atol=1e-5)
    assert torch.equal(seen_t, t)
    if prediction_type == "epsilon":
        target = eps.double()
    else:
        target = a.sqrt() * eps.double() - (1 - a).sqrt() * z.double()
    per_sample = ((out.double() - target) ** 2).mean(dim=(1, 2, 3))
    if gamma > 0:
        snr = (a / (1 - a)).view(-1)
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        w = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
        expected = (w * per_sample).mean()
    else:
        expected = per_sample.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss/mse"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_zero_terminal_snr_with_min_snr_stays_finite():
    """With a zero-terminal-SNR schedule ᾱ_999 = 0, so SNR = 0 and min(SNR, γ)/SNR = 0/0.
    The ε weight must be its limit, 1, not NaN (one NaN sample makes the whole step NaN)."""
    cfg = replace(get_preset("tiny", "unet"), rescale_zero_terminal_snr=True)
    s = build_train_scheduler(cfg)
    assert s.alphas_cumprod[-1].item() == 0.0
    t = torch.tensor([998, 999])
    torch.testing.assert_close(min_snr_weights(s.alphas_cumprod, t, 5.0, "epsilon"),
                               torch.ones(2))
    # v: min(0, γ)/(0 + 1) = 0 is the formula's own (finite) value
    assert min_snr_weights(s.alphas_cumprod, t, 5.0, "v_prediction")[1].item() == 0.0
    z, eps = _latents(2, seed=3)
    out = torch.zeros_like(z)
    loss, _ = DiffusionLoss(s.alphas_cumprod, "epsilon", 5.0)(_Stub(out), z, eps, t)
    # weights are all 1 here, so the loss is the plain MSE against ε
    assert loss.item() == pytest.approx((eps.double() ** 2).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------

def _model(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2)).to(dtype)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_reference_loop(warmup):
    decay, k = 0.5, 20  # warm-up decay (1+m)/(10+m) stays below 0.5 until m = 8
    model = _model(0)
    ema = EMA(model, decay=decay, warmup=warmup)
    ref = [p.detach().double().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for m in range(1, k + 1):  # m-th update, counted from 1 as LDM's LitEma does
        with torch.no_grad():  # "a training step": every weight moves
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        d = min(decay, (1 + m) / (10 + m)) if warmup else decay
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        ref = [d * r + (1 - d) * p.detach().double() for r, p in zip(ref, model.parameters(),
                                                                     strict=True)]
    assert ema.num_updates == k
    for s, r in zip(ema.shadow, ref, strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), r, rtol=0, atol=1e-5)
    # the shadow is not simply the live weights
    assert any(not torch.allclose(s, p.float()) for s, p in zip(ema.shadow, model.parameters(),
                                                                strict=True))

    target = _model(5)
    ema.copy_to(target)
    for s, p in zip(ema.shadow, target.parameters(), strict=True):
        assert torch.equal(p.detach(), s)


def test_ema_keeps_fp32_shadow_of_a_bf16_model():
    model = _model(0, torch.bfloat16)
    ema = EMA(model, decay=0.9)
    before = [p.detach().float().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = 2 / 11  # first update (m = 1): min(0.9, (1 + 1) / (10 + 1))
    for s, b, p in zip(ema.shadow, before, model.parameters(), strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, d * b + (1 - d) * p.float(), rtol=0, atol=1e-6)
    target = _model(3, torch.bfloat16)
    ema.copy_to(target)
    for s, p in zip(ema.shadow, target.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), s.bfloat16())


def test_ema_save_load_round_trip(tmp_path):
    model = _model(0)
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1)
        ema.update(model)
    path = tmp_path / "ema.safetensors"
    ema.save(path)
    on_disk = load_file(str(path))  # a plain safetensors file, keyed by parameter name
    assert set(on_disk) == {n for n, _ in model.named_parameters()}

    restored = EMA(_model(7), decay=0.99)
    restored.load(path)
    assert restored.num_updates == 3
    assert restored.current_decay() == ema.current_decay()
    for a, b in zip(ema.shadow, restored.shadow, strict=True):
        assert torch.equal(a, b)
    # the continued averages agree too
    ema.update(model)
    restored.update(model)
    for a, b in zip(ema.shadow, restored.shadow, strict=True):
        assert torch.equal(a, b)

    other = EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError):
        other.load(path)


# ---------------------------------------------------------------------------------------------
# random draws independent of the process layout
# ---------------------------------------------------------------------------------------------

def _draw(seed=3, step=11, global_batch=8):
    batch = draw_global_batch(seed, step, global_batch, num_entries=100, latent_shape=(3, 4, 4),
                              num_timesteps=T)
    return batch


def test_global_batch_slices_cover_it_for_any_layout():
    batch = _draw()
    batch["row"] = torch.arange(8)  # row ids: which rows each slice took
    two_procs = [slice_for(batch, 4, 0, rank, 2) for rank in (0, 1)]
    two_rounds = [slice_for(batch, 4, r, 0, 1) for r in (0, 1)]
    two_by_two = [slice_for(batch, 2, r, rank, 2) for r in (0, 1) for rank in (0, 1)]
    for parts in (two_procs, two_rounds, two_by_two):
        rows = torch.cat([p["row"] for p in parts])
        assert sorted(rows.tolist()) == list(range(8))  # every row exactly once
    for key in ("indices", "timesteps", "latent_noise", "noise"):
        union_procs = torch.cat([p[key] for p in two_procs])
        union_rounds = torch.cat([p[key] for p in two_rounds])
        assert torch.equal(union_procs, union_rounds)
        assert torch.equal(union_procs, batch[key])
    assert batch["latent_noise"].shape == (8, 3, 4, 4) and batch["noise"].shape == (8, 3, 4, 4)
    assert 0 <= batch["indices"].min() and batch["indices"].max() < 100
    assert 0 <= batch["timesteps"].min() and batch["timesteps"].max() < T


def test_global_batch_depends_only_on_seed_and_step():
    a, b = _draw(step=11), _draw(step=11)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for other in (_draw(step=12), _draw(seed=4, step=11)):
        assert not torch.equal(a["noise"], other["noise"])
        assert not torch.equal(a["latent_noise"], other["latent_noise"])
        assert not torch.equal(a["timesteps"], other["timesteps"])
    # the two noise tensors of one step are different draws
    assert not torch.equal(a["noise"], a["latent_noise"])
