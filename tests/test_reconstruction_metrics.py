"""Tests for ffhq_ldm.evaluation.reconstruction (PSNR / SSIM) against independent computations."""

import math

import numpy as np
import pytest
import torch

from ffhq_ldm.evaluation.reconstruction import psnr, ssim


def _rand_images(n=2, c=3, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1


def test_psnr_constant_error_closed_form():
    x = _rand_images()
    y = x + 0.1
    expected = 10 * math.log10(4 / 0.01)  # data_range^2 / MSE = 2^2 / 0.1^2
    out = psnr(x, y)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-9)


def test_psnr_per_image_and_custom_range():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.5  # MSE 0.25
    y[1] += 0.25  # MSE 0.0625
    out = psnr(x, y, data_range=1.0)
    assert out[0].item() == pytest.approx(10 * math.log10(1 / 0.25))
    assert out[1].item() == pytest.approx(10 * math.log10(1 / 0.0625))
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_identical_is_one():
    x = _rand_images(h=32, w=32).float()
    out = ssim(x, x)
    assert out.shape == (2,)
    assert torch.allclose(out, torch.ones(2), atol=1e-5)


def test_ssim_constant_images_closed_form():
    # Flat images: every local variance/covariance is 0, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) * (C2 / C2), computed by hand.
    a, b = 0.3, -0.2
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    assert ssim(x, y).item() == pytest.approx(expected, abs=1e-12)


def _numpy_ssim_loops(x, y, weights, data_range=2.0, k1=0.01, k2=0.03):
    """Direct transcription of the Wang et al. (2004) formula with explicit window loops."""
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    k = weights.shape[0]
    per_channel = []
    for ch in range(x.shape[0]):
        vals = []
        for i in range(x.shape[1] - k + 1):
            for j in range(x.shape[2] - k + 1):
                px = x[ch, i : i + k, j : j + k]
                py = y[ch, i : i + k, j : j + k]
                mx = np.sum(weights * px)
                my = np.sum(weights * py)
                vx = np.sum(weights * (px - mx) ** 2)
                vy = np.sum(weights * (py - my) ** 2)
                cxy = np.sum(weights * (px - mx) * (py - my))
                vals.append(((2 * mx * my + c1) * (2 * cxy + c2))
                            / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        per_channel.append(np.mean(vals))
    return float(np.mean(per_channel))


@pytest.mark.parametrize("window", ["box", "gaussian"])
def test_ssim_matches_numpy_loops(window):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(3, 15, 14))
    y = np.clip(x + rng.normal(0, 0.3, size=x.shape), -1, 1)
    if window == "box":
        k = 5
        weights = np.full((k, k), 1.0 / (k * k))
        kwargs = dict(win_size=k, window="box")
    else:
        k = 11
        r = np.arange(k) - 5
        g2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5**2))
        weights = g2 / g2.sum()
        kwargs = {}
    expected = _numpy_ssim_loops(x, y, weights)
    got = ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None], **kwargs).item()
    assert got == pytest.approx(expected, abs=1e-10)
    # float32 path agrees to float32 accuracy
    got32 = ssim(torch.from_numpy(x)[None].float(), torch.from_numpy(y)[None].float(),
                 **kwargs).item()
    assert got32 == pytest.approx(expected, abs=1e-5)


def test_ssim_decreases_with_noise():
    x = _rand_images(n=1, h=48, w=48, seed=3).float() * 0.5
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g)
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.0, 0.05, 0.1, 0.2, 0.4)]
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False)), scores
    p = [psnr(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(p, p[1:], strict=False)), p


def test_shape_errors():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))  # smaller than 11x11 window
