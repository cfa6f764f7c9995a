"""Image datasets: a local folder (recursive) or a HuggingFace ``datasets`` dataset.

Every image goes through the same steps, in this order: EXIF orientation applied; converted to
8-bit RGB (transparent pixels composited on a white background, 16-bit scaled down, CMYK and
palette images converted); center-cropped to a square; resized to the target size with an
antialiasing filter (Lanczos); optionally flipped horizontally; scaled to [-1, 1].

FFHQ's ``thumbnails128x128`` (or ``images1024x1024``) folder works as-is.

Hostile data (see ``scan.py`` for the up-front check): a folder is scanned once when it is
opened and files training cannot use are left out, with the reason, before the split is made,
so every stage splits the same usable files. A file that still fails to decode at load time
(corrupt pixel data behind a valid header, a file changed since the scan, a bad row of a
HuggingFace dataset) does not stop training: ``ImageDataset`` substitutes the next index that
decodes (deterministic, so an exact resume stays exact), warns, and records it
(``load_failures()``; trainers write it to ``skipped_files.json``). Images larger than PIL's
decompression-bomb limit are never decoded.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .decode import BACKGROUND as BACKGROUND
from .decode import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS
from .decode import DataError as DataError
from .decode import center_crop_resize as center_crop_resize
from .decode import check_pixels as check_pixels
from .decode import describe_error as describe_error
from .decode import list_images as list_images
from .decode import load_image as load_image
from .decode import open_image as open_image
from .decode import to_rgb as to_rgb
from .scan import SMALL_IMAGE_POLICIES as SMALL_IMAGE_POLICIES
from .scan import scan_folder

# Decoding and listing live in decode.py (shared with scan.py); re-exported here.


# ---------------------------------------------------------------------------------------------
# Tensors

def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]."""
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return from_uint8(torch.from_numpy(array).permute(2, 0, 1))


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (on any device, any layout) -> float32 in [-1, 1]: ``x / 127.5 - 1``, two
    correctly rounded IEEE operations, so a CPU and a GPU give the same bits."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return array.to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------
# Splitting

def split_holdout(items: Sequence, holdout: int, seed: int = 0) -> tuple[list, list]:
    """Deterministic (train, held-out) split: a seeded shuffle, the last ``holdout`` held out.

    At least one image always stays in training; with very few images the held-out part shrinks.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    holdout = max(0, min(holdout, len(items) - 1))
    cut = len(order) - holdout
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]


# Files that failed to decode at load time in this process: {name: reason}. DataLoader workers
# are other processes; they print a warning, and the VAE trainer learns of their substitutions
# from the batches themselves (``ImageDataset.get`` returns the index it used).
_LOAD_FAILURES: dict[str, str] = {}


def load_failures() -> dict[str, str]:
    """Load-time failures seen by this process so far (file or row -> reason)."""
    return dict(_LOAD_FAILURES)


class ImageDataset(Dataset):
    """Images from a list of files or a HF dataset, preprocessed as described above.

    ``flip``: "random" (training), "none", or "always" (the flipped half of a latent cache).
    An image that fails to decode is replaced by the next one that does (see the module notes).
    """

    def __init__(self, items: Sequence, size: int, flip: str = "random",
                 image_key: str | None = None):
        if flip not in ("random", "none", "always"):
            raise ValueError(f"flip must be random, none or always, not {flip!r}")
        self.items, self.size, self.flip, self.image_key = items, size, flip, image_key
        self._bad: set[int] = set()  # indices known not to decode (per process)

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        item = self.items[index]
        return str(item) if self.image_key is None else f"row {index}"

    def _image(self, index: int) -> Image.Image:
        item = self.items[index]
        if self.image_key is not None:  # a row of a datasets.Dataset (decoding happens here)
            item = item[self.image_key]
        return load_image(item, self.size)

    def get(self, index: int) -> tuple[torch.Tensor, int]:
        """(image ``index``, or the next one that decodes; the index actually used)."""
        array, j = self.get_array(index)
        x = from_uint8(torch.from_numpy(array).permute(2, 0, 1))
        if self.flip == "always" or (self.flip == "random" and torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, j

    def get_array(self, index: int) -> tuple[np.ndarray, int]:
        """(image ``index`` as (H, W, 3) uint8, unflipped, or the next one that decodes; the
        index actually used). ``get`` is this, scaled to [-1, 1] (and flipped)."""
        n = len(self.items)
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                image = self._image(j)
            except Exception as exc:  # any decoder error; KeyboardInterrupt is not an Exception
                self._bad.add(j)
                reason = describe_error(exc)
                if self.name(j) not in _LOAD_FAILURES:  # once per file and process
                    print(f"warning: skipping {self.name(j)}: {reason}; using the next image",
                          file=sys.stderr, flush=True)
                _LOAD_FAILURES[self.name(j)] = reason
                continue
            return np.array(image, dtype=np.uint8), j  # a writable copy
        raise DataError(f"none of the {n} images could be decoded (see the warnings above)")

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.get(index)[0]


def _hf_dataset(spec: str):
    """``hf:NAME[:SPLIT]`` or ``hf:imagefolder:PATH`` through the datasets library."""
    import datasets

    rest = spec[3:]
    if rest.startswith("imagefolder:"):
        ds = datasets.load_dataset("imagefolder", data_dir=rest[len("imagefolder:"):],
                                   split="train")
    else:
        name, _, split = rest.partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
    image_keys = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not image_keys:
        raise DataError(f"dataset {spec} has no image column")
    return ds, image_keys[0]


def open_dataset_checked(data: str, size: int, holdout: int, seed: int = 0,
                         small_images: str = "upscale", progress: bool = False):
    """(train items, held-out items, image_key, scan report or None).

    A folder is scanned first (``scan.scan_folder``: header checks, 0.07 ms a 128 px PNG) and
    split after the unusable files are left out, so all stages agree on the split. A
    HuggingFace dataset is not scanned (decoding every row would cost a full pass); its bad
    rows are substituted at load time.
    """
    if small_images not in SMALL_IMAGE_POLICIES:
        raise DataError(f"small_images must be one of {SMALL_IMAGE_POLICIES}, not {small_images!r}")
    if str(data).startswith("hf:"):
        ds, key = _hf_dataset(str(data))
        if len(ds) == 0:
            raise DataError(f"dataset {data} is empty")
        train_idx, held_idx = split_holdout(list(range(len(ds))), holdout, seed)
        return ds.select(train_idx), ds.select(held_idx), key, None

    report = scan_folder(data, size, small_images, progress=progress)
    if not report.usable:
        raise DataError(f"no usable images under {data}: {report.problem_counts()}; "
                        f"`ffhq-ldm scan-data --data {data}` lists each file and its problem")
    train, held = split_holdout(report.usable, holdout, seed)
    return train, held, None, report


def open_dataset(data: str, size: int, holdout: int, seed: int = 0,
                 small_images: str = "upscale"):
    """(train items, held-out items, image_key) for a folder path or an ``hf:`` spec."""
    return open_dataset_checked(data, size, holdout, seed, small_images)[:3]


# Bytes of each file read for its content fingerprint: its first and its last page.
SAMPLE_BYTES = 4096


def file_sample(path: Path) -> bytes:
    """A file's size and its first and last ``SAMPLE_BYTES``: what identifies an image file
    without reading all of it (a PNG's or JPEG's header and first rows, and its last rows)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(0)
        head = fh.read(SAMPLE_BYTES)
        tail = b""
        if size > SAMPLE_BYTES:
            fh.seek(max(size - SAMPLE_BYTES, SAMPLE_BYTES))
            tail = fh.read(SAMPLE_BYTES)
    return size.to_bytes(8, "little") + head + tail


def items_digest(items: Sequence) -> str:
    """Short hash of the training images' content, in their order: ties a latent cache and a
    checkpoint to the images they were made from. The same files reached through another path
    (a symlink, relative or absolute) give the same digest; another folder with as many images
    does not. A file is identified by its size and its first and last 4 KiB (``file_sample``):
    the scan has just read the first page anyway, and reading whole files would cost a full
    pass over the data set at every start."""
    if hasattr(items, "_fingerprint"):  # a datasets.Dataset knows its own content hash
        return str(items._fingerprint)[:16]
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, Path):
            h.update(hashlib.sha256(file_sample(item)).digest())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()[:16]
