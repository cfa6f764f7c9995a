"""How well an autoencoder reconstructs held-out images: PSNR, SSIM, LPIPS (and a grid)."""

from __future__ import annotations

import torch

from .reconstruction import psnr, ssim


@torch.no_grad()
def reconstruction_metrics(reconstruct, batches, perceptual=None, perceptual_name: str = "",
                           keep: int = 8):
    """Mean PSNR/SSIM(/LPIPS) over all images, and the first ``keep`` originals + reconstructions.

    ``reconstruct(x) -> x̂`` maps images in [-1, 1] to reconstructions (the posterior mode, so the
    figures are deterministic). A random-trunk LPIPS is reported as ``lpips_random_trunk``: it
    is a distance, not the LPIPS metric.
    """
    totals, count, originals, recons = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}, 0, [], []
    for x in batches:
        x_hat = reconstruct(x).float().clamp(-1, 1)
        x = x.float()
        totals["psnr"] += psnr(x_hat, x).sum().item()
        totals["ssim"] += ssim(x_hat, x).sum().item()
        if perceptual is not None:
            totals["lpips"] += perceptual(x, x_hat).sum().item()
        count += x.shape[0]
        if sum(o.shape[0] for o in originals) < keep:
            originals.append(x.cpu())
            recons.append(x_hat.cpu())
    if count == 0:
        raise ValueError("no images to evaluate the autoencoder on")
    metrics = {k: v / count for k, v in totals.items()}
    lpips_value = metrics.pop("lpips")
    if perceptual is not None:
        metrics["lpips_random_trunk" if "random" in perceptual_name else "lpips"] = lpips_value
    metrics["num_images"] = count
    pair = (torch.cat(originals)[:keep], torch.cat(recons)[:keep])
    return metrics, pair


def batched(dataset, batch_size: int, device, limit: int | None = None):
    """Stack a map-style dataset into batches on ``device``."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield torch.stack([dataset[i] for i in range(start, min(start + batch_size, n))]).to(device)
