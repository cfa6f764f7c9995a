"""Decoding one image file, and finding the image files of a folder.

Shared by ``images.py`` (datasets) and ``scan.py`` (the up-front check); it imports neither.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
BACKGROUND = (255, 255, 255)  # where transparent pixels end up


class DataError(ValueError):
    """A dataset that cannot be used at all (missing, empty, all unreadable)."""


# ---------------------------------------------------------------------------------------------
# Decoding one image

def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode, with alpha composited on ``BACKGROUND``."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits instead of clipping at 255. The
        # I;16 modes are 16-bit whatever their values (a dark image must stay dark); plain "I"
        # says nothing about the range, so values above 255 decide.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode != "I" or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = Image.alpha_composite(canvas, rgba)
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Largest centred square, resized to ``size`` with Lanczos (antialiased when shrinking)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.LANCZOS)
    return image


# FaceLDM's own pixel limit, below PIL's 89.5 Mpx: a 157 KB PNG can declare a 9000x9000 16-bit
# image that takes about 2 GB of memory to decode, in every data-loader worker. No face photo
# needs more than 40 Mpx (FFHQ's images are 1024x1024; its in-the-wild sources stay well below).
MAX_PIXELS = 40_000_000


def open_image(path) -> Image.Image:
    """``Image.open`` that refuses decompression bombs instead of warning about them.

    PIL only warns between ``MAX_IMAGE_PIXELS`` and twice that (and raises above); a warning
    would let a 170-megapixel image be decoded in a data loader worker, so both are errors, and
    so is anything over ``MAX_PIXELS``. Only the header has been read when this refuses.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(path)
    try:
        check_pixels(image)
    except Image.DecompressionBombError:
        image.close()
        raise
    return image


def check_pixels(image: Image.Image) -> None:
    """The pixel limit (the smaller of PIL's and ``MAX_PIXELS``), also for an image that was
    opened elsewhere (a HuggingFace dataset row)."""
    limit = min(Image.MAX_IMAGE_PIXELS or MAX_PIXELS, MAX_PIXELS)
    if image.width * image.height > limit:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} pixels is over the limit of {limit} pixels "
            "(decoding it would take gigabytes of memory); resize the image first")


def load_image(source, size: int) -> Image.Image:
    """Open a path (or take a PIL image) and return it as a ``size`` x ``size`` RGB image."""
    image = source if isinstance(source, Image.Image) else open_image(source)
    check_pixels(image)
    image.load()
    return center_crop_resize(to_rgb(image), size)


# ---------------------------------------------------------------------------------------------
# Finding images

def list_images(root) -> list[Path]:
    """Every image file below ``root`` (recursive), sorted by relative path."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def describe_error(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {text}"
