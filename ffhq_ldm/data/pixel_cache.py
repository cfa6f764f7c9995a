"""Decoded-image cache for stage 1: every training image decoded once into a uint8 array on
disk, from which the autoencoder's batches are then gathered.

Decoding PNGs costs more than an autoencoder step at small resolutions, and float32 batches
are four times the bytes of the pixels. So the training images (the held-out ones never) are
decoded once, as ``ImageDataset`` decodes them, into ``pixels.u8``: an ``np.memmap`` of shape
(N, H, W, 3), uint8, in image order; FFHQ at 128 px is 70,000 x 49,152 B = 3.4 GB. Batches are
gathered from it by index, moved to the device as uint8 and scaled and mirrored there
(``images.from_uint8``, ``torch.flip``): the same float32 values the DataLoader path makes.

Layout of a cache folder:
    manifest.json  version, images_digest, num_images, resolution, filled, complete,
                   load_failures (files that failed to decode while it was built)
    pixels.u8      N x H x W x 3 uint8

The cache is bound to its images by ``images.items_digest`` (content and order): another set of
images, or a changed or added file, rebuilds it. The manifest (always written by rename,
``io.write_json_atomic``) counts the rows written so far (``filled``), advanced only after the
rows are flushed to disk; a new identity is written (``filled`` 0) before the first row is
overwritten. So an interrupted build resumes at its first unfilled row and a half-built cache
is never read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import fsync_path, write_json_atomic
from .images import ImageDataset, from_uint8, items_digest, load_failures
from .prefetch import decoded_batches

CACHE_VERSION = 1
DATA_FILE = "pixels.u8"
MODES = ("auto", "on", "off")
# "auto" caches when the array takes at most this fraction of the memory available at start:
# the page cache then holds it all, next to the models and the data loader it replaces.
RAM_FRACTION = 0.5
FLUSH_ROWS = 4096  # rows between flushes of the array and the manifest while building
BATCH = 256  # images decoded per batch while building


def cache_bytes(num_images: int, resolution: int) -> int:
    return num_images * resolution * resolution * 3


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def wanted(mode: str, num_images: int, resolution: int) -> bool:
    """Whether stage 1 trains from the cache: ``mode`` "on"/"off" decides; "auto" when the
    array fits in ``RAM_FRACTION`` of the available memory."""
    if mode not in MODES:
        raise ValueError(f"image cache mode must be one of {MODES}, not {mode!r}")
    if mode != "auto":
        return mode == "on"
    return cache_bytes(num_images, resolution) <= RAM_FRACTION * available_memory()


def _identity(items, resolution: int) -> dict:
    return {"version": CACHE_VERSION, "images_digest": items_digest(items),
            "num_images": len(items), "resolution": resolution}


def _read_manifest(cache_dir: Path) -> dict:
    try:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _start(cache_dir: Path, identity: dict) -> tuple[dict, str]:
    """(manifest, memmap mode): the partial build of the same images to continue, or a new one,
    whose manifest is on disk before the array is touched."""
    old = _read_manifest(cache_dir)
    data = cache_dir / DATA_FILE
    size = cache_bytes(identity["num_images"], identity["resolution"])
    if all(old.get(k) == v for k, v in identity.items()) and isinstance(old.get("filled"), int) \
            and data.is_file() and data.stat().st_size == size:
        return old, "r+"
    manifest = dict(identity, filled=0, complete=False, load_failures={})
    write_json_atomic(cache_dir / "manifest.json", manifest)
    return manifest, "w+"


def build_pixel_cache(items, cache_dir, resolution: int, image_key=None,
                      threads: int | None = None, progress: bool = True) -> Path:
    """Decode ``items`` into ``cache_dir`` (see the module notes), unless it already holds
    them; ``threads`` decoding threads (None: one per core, at most 8)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    identity = _identity(items, resolution)
    manifest, mode = _start(cache_dir, identity)
    if manifest.get("complete"):
        return cache_dir
    n = len(items)
    array = np.memmap(cache_dir / DATA_FILE, dtype=np.uint8, mode=mode,
                      shape=(n, resolution, resolution, 3))
    dataset = ImageDataset(items, resolution, flip="none", image_key=image_key)
    names = {dataset.name(i) for i in range(n)}
    row = manifest["filled"]
    with tqdm(total=n, initial=row, desc="decoding images", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for pixels, count in decoded_batches(dataset, row, n, BATCH, threads):
            array[row:row + count] = pixels.permute(0, 2, 3, 1).numpy()
            row += count
            bar.update(count)
            if row % FLUSH_ROWS < count or row == n:
                array.flush()
                fsync_path(cache_dir / DATA_FILE)
                failures = {k: v for k, v in load_failures().items() if k in names}
                manifest.update(filled=row, complete=row == n,
                                load_failures={**manifest["load_failures"], **failures})
                write_json_atomic(cache_dir / "manifest.json", manifest)
    del array
    return cache_dir


class PixelCache:
    """A complete cache, read-only: ``batch(indices, device)`` gathers a training batch."""

    def __init__(self, cache_dir, items, resolution: int):
        self.dir = Path(cache_dir)
        manifest = _read_manifest(self.dir)
        identity = _identity(items, resolution)
        if not manifest.get("complete") or any(manifest.get(k) != v for k, v in identity.items()):
            raise ValueError(f"{self.dir} holds no complete image cache of these images; "
                             "build_pixel_cache makes it")
        self.n, self.load_failures = len(items), dict(manifest.get("load_failures", {}))
        self.array = np.memmap(self.dir / DATA_FILE, dtype=np.uint8, mode="r",
                               shape=(self.n, resolution, resolution, 3))

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: torch.Tensor, device) -> torch.Tensor:
        """Images ``indices % n``, mirrored where ``indices >= n`` (``EpochSampler``'s
        encoding), as (B, 3, H, W) float32 in [-1, 1] on ``device``; only uint8 crosses to it."""
        device = torch.device(device)
        rows = torch.from_numpy(self.array[(indices % self.n).numpy()])  # a copy, (B, H, W, 3)
        if device.type == "cuda":
            rows = rows.pin_memory()
        x = from_uint8(rows.to(device, non_blocking=True).permute(0, 3, 1, 2))
        flip = (indices >= self.n).to(device, non_blocking=True)[:, None, None, None]
        return torch.where(flip, torch.flip(x, dims=[3]), x).contiguous()

