"""Latent cache: every training image (and its mirror image) encoded once.

Encoding on the fly costs more than the UNet step it feeds (docs/design.md, Latent cache), so
stage 2 trains from a cache of the posterior's mean and std (as EDM2 does) and draws
``z = (mean + std · ε) · scaling_factor`` afresh each step, keeping the autoencoder's noise.

The autoencoder comes in as a codec (``ffhq_ldm.models.vae.LatentCodec``, built by the
caller): ``encode(images) -> (mean, std)``, ``fingerprint``, ``scaling_factor``,
``sample_size``, ``latent_shape``. The data package never imports the models.

Layout of a cache folder:
    manifest.json          VAE fingerprint, image count, resolution, latent shape, shard list
    shard-00000.safetensors  "mean", "std": float16, (2B, C, h, w): B originals then B mirrors
A shard is written to a temporary name and renamed, then the manifest is rewritten (also by
rename), so an interrupted encoding resumes at the first missing shard and a cache built by
another autoencoder, or from other images, is refused.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..io import write_json_atomic
from .images import ImageDataset, items_digest, open_dataset
from .split import read_split

CACHE_VERSION = 2  # 2: images identified by content, not by path (items_digest)
STORE_DTYPE = torch.float16


class CacheMismatchError(ValueError):
    """The cache on disk was built from another autoencoder or other images."""


@dataclass
class LatentCache:
    mean: torch.Tensor  # (M, C, h, w), M = 2 x images (originals and mirrors)
    std: torch.Tensor
    scaling_factor: float

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device) -> LatentCache:
        return LatentCache(self.mean.to(device), self.std.to(device), self.scaling_factor)

    def sample(self, indices: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents ``(mean + std · ε) · scaling_factor`` for the given entries, fp32."""
        mean = self.mean[indices].float()
        std = self.std[indices].float()
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return (mean + std * noise) * self.scaling_factor


def _manifest_path(cache_dir: Path) -> Path:
    return cache_dir / "manifest.json"


def _expected_identity(codec, items, resolution: int) -> dict:
    return {"version": CACHE_VERSION, "vae_fingerprint": codec.fingerprint,
            "num_images": len(items), "images_digest": items_digest(items),
            "resolution": resolution}


def _check_identity(manifest: dict, expected: dict, cache_dir: Path) -> None:
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            what = {"vae_fingerprint": "a different autoencoder (weights or config)",
                    "images_digest": "a different set of images",
                    "num_images": "a different number of images",
                    "resolution": "a different resolution", "version": "an older cache format"}[key]
            raise CacheMismatchError(
                f"the latent cache in {cache_dir} was built from {what} ({key}: {have} != {want}). "
                f"Use another --latent-cache folder, or delete this one to rebuild it.")


# diffusers' DiagonalGaussianDistribution clamps the log-variance to [-30, 20]: a posterior
# std above exp(10) cannot come from an encoder.
MAX_STD = 22026.5


def read_manifest(cache_dir: Path) -> dict:
    """``manifest.json`` as a dict, or a one-line ``CacheMismatchError`` when it is damaged."""
    path = _manifest_path(cache_dir)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheMismatchError(f"{path} is not valid JSON ({exc}); delete {cache_dir} to "
                                 "rebuild the cache") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise CacheMismatchError(f"{path} is not a latent cache manifest; delete {cache_dir} "
                                 "to rebuild the cache")
    return manifest


def shard_path(cache_dir: Path, name) -> Path:
    """A shard listed in the manifest: a plain file name inside the cache folder, nothing else
    (an absolute path or ``..`` would read files from anywhere)."""
    if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or \
            not name.endswith(".safetensors"):
        raise CacheMismatchError(f"{_manifest_path(cache_dir)} lists {name!r}, not a shard file "
                                 f"of {cache_dir}; delete the folder to rebuild the cache")
    return cache_dir / name


def check_shard(path: Path, shard: dict, latent_shape: tuple) -> None:
    """What a shard must hold: "mean" and "std" of the codec's latent shape, float16, finite,
    0 <= std <= ``MAX_STD``."""
    problem = None
    mean, std = shard.get("mean"), shard.get("std")
    if mean is None or std is None:
        problem = "no 'mean' or 'std' tensor"
    elif mean.dtype != STORE_DTYPE or std.dtype != STORE_DTYPE:
        problem = f"dtype {mean.dtype}/{std.dtype}, not {STORE_DTYPE}"
    elif tuple(mean.shape[1:]) != tuple(latent_shape) or mean.shape != std.shape:
        problem = (f"latents of shape {tuple(mean.shape[1:])}, but the autoencoder's are "
                   f"{tuple(latent_shape)}")
    elif not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        problem = "non-finite values"
    elif (std < 0).any() or (std > MAX_STD).any():
        problem = f"a std outside [0, {MAX_STD:g}]"
    if problem:
        raise CacheMismatchError(f"latent cache shard {path} holds {problem}; delete "
                                 f"{path.parent} to rebuild the cache")


def load_shard(path: Path, latent_shape: tuple) -> dict:
    try:
        shard = load_file(str(path))
    except Exception as exc:  # a truncated or foreign file: safetensors' own errors
        raise CacheMismatchError(f"latent cache shard {path} is unreadable ({exc}); delete "
                                 f"{path.parent} to rebuild the cache") from None
    check_shard(path, shard, latent_shape)
    return shard


def split_for_vae(vae_dir, default_resolution: int, data: str):
    """(train items, held-out items, image_key, resolution) split as the autoencoder's training was.

    Stage 2 and the evaluation then never see stage 1's held-out images either. An autoencoder
    exported elsewhere (no split file) holds nothing out, at ``default_resolution`` (its
    ``sample_size``).
    """
    split = read_split(vae_dir, default_resolution)
    train, held, key = open_dataset(data, split["resolution"], split["holdout"],
                                    split["split_seed"], split.get("small_images", "upscale"))
    return train, held, key, split["resolution"]


@torch.no_grad()
def build_latent_cache(codec, items, cache_dir, resolution: int, image_key=None,
                       batch_size: int = 64, num_workers: int = 0, device="cpu",
                       dtype=torch.float32, progress: bool = True) -> Path:
    """Encode ``items`` (and their mirrors) with ``codec`` into ``cache_dir``, resuming a partial
    cache."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    expected = _expected_identity(codec, items, resolution)
    manifest_file = _manifest_path(cache_dir)
    manifest = dict(expected, shard_size=batch_size, shards=[], complete=False)
    if manifest_file.is_file():
        old = read_manifest(cache_dir)
        _check_identity(old, expected, cache_dir)
        if old.get("complete"):
            return cache_dir
        if old.get("shard_size") == batch_size:
            manifest = old  # resume: trust only the shards the manifest lists
    done = len(manifest["shards"])
    start = done * batch_size
    if start >= len(items) and len(items) > 0:
        manifest["complete"] = True
        write_json_atomic(manifest_file, manifest)
        return cache_dir

    dataset = ImageDataset(items, resolution, flip="none", image_key=image_key)
    subset = torch.utils.data.Subset(dataset, range(start, len(items)))
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    codec = codec.to(device)
    bar = tqdm(total=len(items), initial=start, desc="encoding latents", unit="img",
               disable=not progress, dynamic_ncols=True)
    t0, encoded = time.perf_counter(), 0
    for shard_index, images in enumerate(loader, start=done):
        images = images.to(device=device, dtype=dtype)
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype,
                            enabled=dtype != torch.float32):
            mean, std = codec.encode(torch.cat([images, images.flip(-1)]))
        if tuple(mean.shape[1:]) != tuple(codec.latent_shape):
            raise CacheMismatchError(
                f"the autoencoder encodes {resolution} px images to latents of shape "
                f"{tuple(mean.shape[1:])}, not {codec.latent_shape}")
        name = f"shard-{shard_index:05d}.safetensors"
        tmp = cache_dir / (name + ".tmp")
        save_file({"mean": mean.to(STORE_DTYPE).cpu().contiguous(),
                   "std": std.to(STORE_DTYPE).cpu().contiguous()}, str(tmp))
        os.replace(tmp, cache_dir / name)
        manifest["shards"].append(name)
        manifest["latent_shape"] = list(mean.shape[1:])
        write_json_atomic(manifest_file, manifest)
        encoded += images.shape[0]
        bar.update(images.shape[0])
        bar.set_postfix(img_per_s=f"{encoded / (time.perf_counter() - t0):.1f}")
    bar.close()
    manifest["complete"] = True
    write_json_atomic(manifest_file, manifest)
    return cache_dir


def load_latent_cache(cache_dir, codec, items=None, resolution: int | None = None) -> LatentCache:
    """Load a complete cache, refusing one that does not belong to ``codec`` (and ``items``)."""
    cache_dir = Path(cache_dir)
    manifest_file = _manifest_path(cache_dir)
    if not manifest_file.is_file():
        raise FileNotFoundError(f"no latent cache in {cache_dir} (no manifest.json)")
    manifest = read_manifest(cache_dir)
    if items is not None:
        _check_identity(manifest, _expected_identity(codec, items, resolution), cache_dir)
    elif manifest.get("vae_fingerprint") != codec.fingerprint:
        raise CacheMismatchError(f"the latent cache in {cache_dir} was built from a different "
                                 "autoencoder; rebuild it or pass the matching --vae")
    if not manifest.get("complete"):
        raise CacheMismatchError(f"the latent cache in {cache_dir} is incomplete; rerun the "
                                 "caching step to finish it")
    means, stds = [], []
    for name in manifest["shards"]:
        shard = load_shard(shard_path(cache_dir, name), codec.latent_shape)
        means.append(shard["mean"])
        stds.append(shard["std"])
    count = sum(m.shape[0] for m in means)
    if isinstance(manifest.get("num_images"), int) and count != 2 * manifest["num_images"]:
        raise CacheMismatchError(f"the latent cache in {cache_dir} holds {count} latents for "
                                 f"{manifest['num_images']} images (x2 mirrors); delete it to "
                                 "rebuild it")
    return LatentCache(torch.cat(means), torch.cat(stds), codec.scaling_factor)
