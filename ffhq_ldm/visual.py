"""Image grids for previews, reconstructions and sample folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_array(images, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 images, or (N, 3, H, W) tensors in [-1, 1], tiled row by row."""
    if torch.is_tensor(images):
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
        images = images.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = np.asarray(images)
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = image
    return canvas


def save_grid(images, path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(images, nrow)).save(path)
    return path


def log_grid(accelerator, tag: str, images, step: int, nrow: int | None = None) -> bool:
    """Add a grid of ``images`` (as ``grid_array`` takes them) to the run's TensorBoard log at
    ``step``, beside its PNG file; False when the run logs no TensorBoard."""
    tracker = accelerator.get_tracker("tensorboard") if accelerator.log_with else None
    writer = getattr(tracker, "writer", None)
    if writer is None:
        return False
    writer.add_image(tag, grid_array(images, nrow), step, dataformats="HWC")
    return True
