"""Image datasets: a local folder (recursive) or a HuggingFace ``datasets`` dataset.

Every image goes through the same steps, in this order: EXIF orientation applied; converted to
8-bit RGB (transparent pixels composited on a white background, 16-bit scaled down, CMYK and
palette images converted); center-cropped to a square; resized to the target size with an
antialiasing filter (Lanczos); optionally flipped horizontally; scaled to [-1, 1].

FFHQ's ``thumbnails128x128`` (or ``images1024x1024``) folder works as-is.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

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
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
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


def load_image(source, size: int) -> Image.Image:
    """Open a path (or take a PIL image) and return it as a ``size`` x ``size`` RGB image."""
    if isinstance(source, Image.Image):
        image = source
    else:
        image = Image.open(source)
    image.load()
    return center_crop_resize(to_rgb(image), size)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return array.to(torch.uint8).permute(0, 2, 3, 1).numpy()


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


def split_holdout(items: Sequence, holdout: int, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, held-out) split: a seeded shuffle, the last ``holdout`` held out.

    At least one image always stays in training; with very few images the held-out part shrinks.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    holdout = max(0, min(holdout, len(items) - 1))
    cut = len(order) - holdout
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]


class ImageDataset(Dataset):
    """Images from a list of files or a HF dataset, preprocessed as described above.

    ``flip``: "random" (training), "none", or "always" (the flipped half of a latent cache).
    """

    def __init__(self, items: Sequence, size: int, flip: str = "random", image_key: str | None = None):
        if flip not in ("random", "none", "always"):
            raise ValueError(f"flip must be random, none or always, not {flip!r}")
        self.items, self.size, self.flip, self.image_key = items, size, flip, image_key

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, index: int) -> Image.Image:
        item = self.items[index]
        if self.image_key is not None:  # a row of a datasets.Dataset
            item = item[self.image_key]
        return load_image(item, self.size)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = to_tensor(self._image(index))
        if self.flip == "always" or (self.flip == "random" and torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x


def _hf_dataset(spec: str):
    """``hf:NAME[:SPLIT]`` or ``hf:imagefolder:PATH`` through the datasets library."""
    import datasets

    rest = spec[3:]
    if rest.startswith("imagefolder:"):
        ds = datasets.load_dataset("imagefolder", data_dir=rest[len("imagefolder:"):], split="train")
    else:
        name, _, split = rest.partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    image_keys = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_keys:
        raise DataError(f"dataset {spec} has no image column")
    return ds, image_keys[0]


def open_dataset(data: str, size: int, holdout: int, seed: int = 0):
    """(train items, held-out items, image_key) for a folder path or an ``hf:`` spec."""
    if str(data).startswith("hf:"):
        ds, key = _hf_dataset(str(data))
        if len(ds) == 0:
            raise DataError(f"dataset {data} is empty")
        train_idx, held_idx = split_holdout(list(range(len(ds))), holdout, seed)
        return ds.select(train_idx), ds.select(held_idx), key
    train, held = split_holdout(list_images(data), holdout, seed)
    return train, held, None


def items_digest(items: Sequence) -> str:
    """Short hash of the file list: ties a latent cache to the images it was built from."""
    if hasattr(items, "_fingerprint"):  # a datasets.Dataset knows its own content hash
        return str(items._fingerprint)[:16]
    h = hashlib.sha256()
    for item in items:
        h.update(str(item).encode() if isinstance(item, Path) else repr(item).encode())
    return h.hexdigest()[:16]
