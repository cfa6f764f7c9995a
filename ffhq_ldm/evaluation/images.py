"""Image-folder reading for evaluation, with the same decoding as training.

Every image goes through ``ffhq_ldm.data.images``: EXIF orientation, 8-bit RGB (alpha on
white), centre square crop and, if its side differs from ``resolution``, a LANCZOS resize
(antialiased, so downscaling large photos does not alias). Arrays are uint8 ``(N, H, W, 3)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..data import images as data_images
from .errors import EvaluationError

IMAGE_EXTENSIONS = data_images.IMAGE_EXTENSIONS


def list_images(folder: str, what: str = "image folder") -> list[str]:
    """Sorted list of image paths found recursively under ``folder``.

    Raises :class:`EvaluationError` when the folder is missing or holds no image.
    """
    if folder is None or not os.path.isdir(folder):
        raise EvaluationError(f"{what} not found: {folder!r} is not a directory")
    try:
        return [str(p) for p in data_images.list_images(folder)]
    except data_images.DataError:
        raise EvaluationError(f"{what} {folder!r} contains no images (looked recursively for "
                              f"{', '.join(IMAGE_EXTENSIONS)})") from None


def relative_names(paths: Sequence[str], root: str) -> list[str]:
    """Paths relative to ``root`` with forward slashes (stable identifiers stored in reference
    files)."""
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def center_crop_resize(img: Image.Image, resolution: int | None) -> np.ndarray:
    """RGB, centre square crop, LANCZOS resize to ``resolution`` (None keeps the crop size)."""
    rgb = data_images.to_rgb(img)
    size = resolution or min(rgb.size)
    return np.asarray(data_images.center_crop_resize(rgb, size), dtype=np.uint8)


def load_image(path: str, resolution: int | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return center_crop_resize(img, resolution)
    except (OSError, ValueError) as exc:  # corrupt / unreadable file
        raise EvaluationError(f"cannot read image {path!r}: {exc}") from exc


def iter_image_batches(
    paths: Sequence[str], resolution: int | None, batch_size: int, num_threads: int = 4
) -> Iterator[np.ndarray]:
    """Yield uint8 batches ``(B, H, W, 3)``; decoding runs in a small thread pool (PIL releases the
    GIL)."""
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            yield np.stack(list(pool.map(lambda p: load_image(p, resolution), chunk)))


def load_images(paths: Sequence[str], resolution: int | None, batch_size: int = 256) -> np.ndarray:
    """All images as one uint8 array ``(N, H, W, 3)``."""
    if len(paths) == 0:
        raise EvaluationError("no images to load")
    return np.concatenate(list(iter_image_batches(paths, resolution, batch_size)), axis=0)


def save_images(images: np.ndarray, folder: str, prefix: str = "sample",
                start: int = 0) -> list[str]:
    """Write uint8 ``(N, H, W, 3)`` images as PNG files; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, im in enumerate(images):
        p = os.path.join(folder, f"{prefix}_{start + i:06d}.png")
        Image.fromarray(im).save(p)
        out.append(p)
    return out
