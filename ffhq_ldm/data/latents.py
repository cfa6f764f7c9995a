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
A shard is written to a temporary name and renamed, and listed in the manifest (rewritten by
rename every few shards and at the end) only after that, so an interrupted encoding resumes at
the first unlisted shard and a cache built by another autoencoder, or from other images, is
refused.

The build runs on the fast path (``LatentEncoder``): images decoded by a pool of threads
(``prefetch``) while the device encodes, shipped as uint8 and scaled on the device, bf16
autocast, channels_last and a compiled encoder on CUDA (fp32, plain and eager on a CPU), and
the shards written by a background thread (``shard_writer``), so the encoding loop never waits
for a file or for the device. In fp32 it stores the same bits as a plain loop over the images
(``images.ImageDataset``, ``codec.encode``, float16).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..io import write_json_atomic
from .images import ImageDataset, from_uint8, items_digest, open_dataset
from .prefetch import decoded_batches
from .shard_writer import ShardWriter
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


def default_batch_size(device) -> int:
    """Images encoded at once (and per shard) when none is asked for: 256 on CUDA, 64 elsewhere."""
    return 256 if torch.device(device).type == "cuda" else 64


def default_dtype(device) -> torch.dtype:
    """The encoder's autocast precision when none is asked for: bf16 on CUDA, fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class LatentEncoder:
    """``codec.encode`` on the fast path: uint8 pixels go to the device and are scaled there
    (``images.from_uint8``), each batch is encoded with its mirror images, under autocast
    ``dtype`` (None: ``default_dtype``; fp32 runs no autocast), channels_last and compiled where
    wanted (``speed``: both on CUDA by default, off on a CPU). Returns (mean, std) as stored,
    float16 on the device, originals then mirrors, without a host sync.

    ``restore()`` puts the autoencoder's weights back in the default memory layout.
    """

    def __init__(self, codec, device, dtype: torch.dtype | None = None,
                 compile: bool | None = None, channels_last: bool | None = None,
                 compile_mode: str | None = None):
        from ..speed import channels_last_wanted, compile_wanted, to_channels_last

        self.codec, self.device = codec.to(device), torch.device(device)
        self.dtype = default_dtype(device) if dtype is None else dtype
        self.channels_last = (channels_last_wanted(device) if channels_last is None
                              else channels_last)
        to_channels_last(codec.vae, self.channels_last)
        self.compiled = compile_wanted(codec.vae, compile)
        self.encode = (torch.compile(codec.encode, mode=compile_mode, dynamic=False)
                       if self.compiled else codec.encode)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = from_uint8(pixels.to(self.device, non_blocking=True))
        x = torch.cat([x, x.flip(-1)])
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.autocast(device_type=self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            mean, std = self.encode(x.contiguous(memory_format=layout))
        if tuple(mean.shape[1:]) != tuple(self.codec.latent_shape):
            raise CacheMismatchError(
                f"the autoencoder encodes {tuple(pixels.shape[-2:])} px images to latents of "
                f"shape {tuple(mean.shape[1:])}, not {self.codec.latent_shape}")
        return mean.to(STORE_DTYPE), std.to(STORE_DTYPE)

    def restore(self) -> None:
        self.codec.vae.to(memory_format=torch.contiguous_format)


def _start(codec, items, cache_dir: Path, resolution: int, batch_size: int,
           dtype: torch.dtype) -> dict | None:
    """The manifest to continue (a partial cache of the same identity, shard size and encoder
    precision) or to start; None when the cache is already complete. Refuses a cache of
    another identity."""
    expected = _expected_identity(codec, items, resolution)
    precision = str(dtype).removeprefix("torch.")
    manifest = dict(expected, shard_size=batch_size, encode_dtype=precision, shards=[],
                    complete=False)
    if _manifest_path(cache_dir).is_file():
        old = read_manifest(cache_dir)
        _check_identity(old, expected, cache_dir)
        if old.get("complete"):
            return None
        if old.get("shard_size") == batch_size and \
                old.get("encode_dtype", "float32") == precision:
            manifest = old  # resume: trust only the shards the manifest lists
    return manifest


def _host_copy(mean: torch.Tensor, std: torch.Tensor, count: int, batch: int):
    """The shard's tensors on the host (the ``count`` real images of a padded batch, then their
    mirrors) and the CUDA event the writer waits for (None on a CPU): no sync here."""
    if batch != count:
        mean = torch.cat([mean[:count], mean[batch:batch + count]])
        std = torch.cat([std[:count], std[batch:batch + count]])
    if mean.device.type != "cuda":
        return {"mean": mean.cpu(), "std": std.cpu()}, None
    host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in
            (("mean", mean), ("std", std))}
    host["mean"].copy_(mean, non_blocking=True)
    host["std"].copy_(std, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


@torch.no_grad()
def build_latent_cache(codec, items, cache_dir, resolution: int, image_key=None,
                       batch_size: int | None = None, num_workers: int | None = None,
                       device="cpu", dtype: torch.dtype | None = None, compile: bool | None = None,
                       progress: bool = True) -> Path:
    """Encode ``items`` (and their mirrors) with ``codec`` into ``cache_dir``, resuming a partial
    cache: ``LatentEncoder`` on the device (``dtype``, ``compile``: None picks per device),
    ``num_workers`` decoding threads (None: one per core, at most 8; 0: none), shards of
    ``batch_size`` images (None: ``default_batch_size``) written by a background thread."""
    cache_dir, device = Path(cache_dir), torch.device(device)
    batch_size = batch_size or default_batch_size(device)
    dtype = default_dtype(device) if dtype is None else dtype
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = _start(codec, items, cache_dir, resolution, batch_size, dtype)
    if manifest is None:
        return cache_dir
    done = len(manifest["shards"])
    manifest["latent_shape"] = list(codec.latent_shape)
    encoder = LatentEncoder(codec, device, dtype, compile)
    dataset = ImageDataset(items, resolution, flip="none", image_key=image_key)
    batches = decoded_batches(dataset, min(done * batch_size, len(items)), len(items),
                              batch_size, num_workers, pad=encoder.compiled,
                              pin=device.type == "cuda")
    writer = ShardWriter(cache_dir, manifest, save=save_file)
    bar = tqdm(total=len(items), initial=min(done * batch_size, len(items)),
               desc="encoding latents", unit="img", disable=not progress, dynamic_ncols=True)
    t0, encoded = time.perf_counter(), 0
    try:
        for shard_index, (pixels, count) in enumerate(batches, start=done):
            mean, std = encoder(pixels)
            tensors, ready = _host_copy(mean, std, count, pixels.shape[0])
            writer.put(f"shard-{shard_index:05d}.safetensors", tensors, ready)
            encoded += count
            bar.update(count)
            bar.set_postfix(img_per_s=f"{encoded / (time.perf_counter() - t0):.1f}")
    except BaseException:
        writer.close(abort=True)
        raise
    finally:
        encoder.restore()
        bar.close()
    writer.close()
    manifest["complete"] = True
    write_json_atomic(_manifest_path(cache_dir), manifest)
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
