"""Per-image reconstruction metrics (PSNR, SSIM) for autoencoder evaluation.

Both functions take two batches ``x`` and ``y`` of shape ``(N, C, H, W)`` with
values in ``[-1, 1]`` (so the default ``data_range`` is 2) and return a tensor of
shape ``(N,)`` with one value per image.  They run on whatever device the inputs
live on and never build an autograd graph that matters for training (call them
under ``torch.no_grad()`` in loops; they are differentiable anyway).

SSIM follows Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From
Error Visibility to Structural Similarity", IEEE TIP 2004:

* local statistics are weighted with an 11x11 circular-symmetric Gaussian
  window (sigma = 1.5), normalised to sum to 1;
* ``C1 = (K1 L)^2``, ``C2 = (K2 L)^2`` with ``K1 = 0.01``, ``K2 = 0.03`` and
  ``L`` the dynamic range (``data_range``);
* local variances / covariance are the *weighted population* moments
  ``E_w[x^2] - E_w[x]^2`` (no Bessel correction), as in the authors' reference
  MATLAB code ``ssim_index.m``;
* the SSIM map is evaluated on the **valid region** only (no padding: a window
  is used only where it lies entirely inside the image, exactly like the
  reference ``filter2(..., 'valid')``), so an ``H x W`` image yields an
  ``(H-10) x (W-10)`` map;
* the map is averaged spatially for each channel, and the per-channel means are
  averaged over channels (the usual extension of the grey-scale definition to
  RGB).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "gaussian_window"]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) tensors, got shape {tuple(x.shape)}")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # Half precision loses too much in E[x^2] - E[x]^2; float64 inputs stay float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, one value per image.

    ``PSNR = 10 log10(data_range^2 / MSE)`` with the MSE taken over all channels
    and pixels of each image.  Identical images give ``+inf``.
    """
    _check_pair(x, y)
    dt = _work_dtype(x)
    mse = (x.to(dt) - y.to(dt)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10((data_range**2) / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """Normalised 2-D Gaussian window of shape ``(size, size)`` (sums to 1)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    win_size: int = 11,
    sigma: float = 1.5,
    window: str = "gaussian",
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), one value per image.

    Defaults are the standard ones (11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03,
    valid-region map, channel average).  ``window="box"`` uses a uniform
    ``win_size x win_size`` window instead (handy for checking against a plain
    hand computation); it is not the standard setting.
    """
    _check_pair(x, y)
    n, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"images of size {h}x{w} are smaller than the {win_size}x{win_size} SSIM "
                         "window")
    dt = _work_dtype(x)
    x = x.to(dt)
    y = y.to(dt)
    if window == "gaussian":
        win = gaussian_window(win_size, sigma, dtype=dt, device=x.device)
    elif window == "box":
        win = torch.full((win_size, win_size), 1.0 / (win_size * win_size), dtype=dt,
                         device=x.device)
    else:
        raise ValueError(f"window must be 'gaussian' or 'box', got {window!r}")
    # Depthwise convolution: the same window applied to every channel independently.
    kernel = win.expand(c, 1, win_size, win_size).contiguous()

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)  # no padding -> valid region

    mu_x = filt(x)
    mu_y = filt(y)
    # Weighted population moments (the window sums to 1, so no 1/(n-1) correction).
    var_x = filt(x * x) - mu_x.pow(2)
    var_y = filt(y * y) - mu_y.pow(2)
    cov_xy = filt(x * y) - mu_x * mu_y

    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
    den = (mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2)
    ssim_map = num / den
    # Spatial mean per channel, then mean over channels.
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)


def _self_check() -> None:  # pragma: no cover - tiny manual sanity check
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    print("psnr(x,x+0.1)", psnr(x, x + 0.1), "expected", 10 * math.log10(4 / 0.01))
    print("ssim(x,x)", ssim(x, x))


if __name__ == "__main__":  # pragma: no cover
    _self_check()
