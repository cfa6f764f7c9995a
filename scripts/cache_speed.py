"""Images per second of the two data caches, old way and new way side by side, in one run.

    python scripts/cache_speed.py --data FACES --vae VAE_DIR [--old-root CHECKOUT] [--images N]
        [--stream-images M] [--repeats R]

1. The latent cache builder (what ``train_unet.py`` and ``ffhq-ldm cache-latents`` run) on the
   training split of ``--data`` as the autoencoder's export records it: the current builder
   with its defaults for the device, and, with ``--old-root`` (a checkout of the previous code),
   the previous builder as ``train_unet.py`` ran it (batch 64, no loader workers), in a
   subprocess. Each writes a fresh cache; the seconds include decoding, encoding and writing.
2. Stage 1's batches: the DataLoader path (``FlipEncoded`` + ``EpochSampler``, the preset's
   batch size and workers) against the decoded-image cache (its one-off build timed apart),
   over one epoch of the same images, batches on ``--device``.

Each pair is measured ``--repeats`` times, old and new in turn, so that both see the same
changes of a shared machine's load; a line gives wall seconds and, for the builders, the CPU
seconds of the process (all its threads), which depend less on that load. The machine's load
(``os.getloadavg``) is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OLD_BUILD = """
import sys, time, torch
from ffhq_ldm.data.latents import build_latent_cache, split_for_vae
from ffhq_ldm.models.vae import LatentCodec, load_vae
torch.set_num_threads({threads})
vae = load_vae({vae!r}).eval()
train, _, key, res = split_for_vae({vae!r}, vae.config.sample_size, {data!r})
train = train[:{images}]
t0, c0 = time.perf_counter(), time.process_time()
build_latent_cache(LatentCodec(vae), train, {out!r}, res, image_key=key, batch_size=64,
                   progress=False)
print(len(train), time.perf_counter() - t0, time.process_time() - c0)
"""


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def say(what: str, images: int, wall: float, cpu: float | None = None) -> None:
    line = f"{what}: {images} images in {wall:.1f} s = {images / wall:.1f} img/s"
    if cpu is not None:
        line += f" (CPU {cpu:.1f} s = {1000 * cpu / images:.1f} ms/img)"
    print(line, flush=True)


def old_builder(args, out: Path) -> None:
    import torch

    code = OLD_BUILD.format(threads=torch.get_num_threads(), vae=str(args.vae),
                            data=str(args.data), images=args.images, out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(args.old_root)}, check=True)
    n, wall, cpu = done.stdout.split()[-3:]
    say("latent cache, previous builder (batch 64, serial decode, fp32)", int(n), float(wall),
        float(cpu))


def new_builder(args, out: Path) -> None:
    from ffhq_ldm.data.latents import build_latent_cache, split_for_vae
    from ffhq_ldm.models.vae import LatentCodec, load_vae

    vae = load_vae(args.vae).eval()
    train, _, key, res = split_for_vae(args.vae, vae.config.sample_size, args.data)
    train = train[:args.images]
    t0, c0 = time.perf_counter(), time.process_time()
    build_latent_cache(LatentCodec(vae), train, out, res, image_key=key, device=args.device,
                       progress=False)
    say(f"latent cache, current builder (defaults on {args.device})", len(train),
        time.perf_counter() - t0, time.process_time() - c0)


def epoch_rate(batches, count: int, batch_size: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - t0)


def stage1_streams(args, tmp: Path, repeat: int) -> None:
    from types import SimpleNamespace

    import torch

    from ffhq_ldm.config import get_preset
    from ffhq_ldm.data.images import list_images
    from ffhq_ldm.data.pixel_cache import PixelCache, build_pixel_cache
    from ffhq_ldm.train import stage1
    from ffhq_ldm.train.run import EpochSampler

    config = get_preset(args.preset, "vae")
    files = list_images(args.data)[:args.stream_images or args.images]
    size, per_epoch = config.batch_size, len(files) // config.batch_size
    run = SimpleNamespace(step=0, procs=1, device=torch.device(args.device), config=config,
                          accelerator=SimpleNamespace(process_index=0))
    train_set = stage1.FlipEncoded(files, config.resolution, None)
    sampler = EpochSampler(len(files), config.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=size, sampler=sampler,
                                         drop_last=True, num_workers=config.num_workers)
    rate = epoch_rate(stage1.batch_stream(run, loader, sampler, per_epoch), per_epoch, size)
    print(f"stage 1 batches, DataLoader ({config.num_workers} workers, batch {size}): "
          f"{rate:.1f} img/s", flush=True)
    t0 = time.perf_counter()
    build_pixel_cache(files, tmp / f"pixels{repeat}", config.resolution, progress=False)
    build = time.perf_counter() - t0
    cache = PixelCache(tmp / f"pixels{repeat}", files, config.resolution)
    stream = stage1.cached_stream(run, cache, EpochSampler(len(files), config.seed), per_epoch)
    rate = epoch_rate(stream, per_epoch, size)
    print(f"stage 1 batches, decoded-image cache (batch {size}): {rate:.1f} img/s "
          f"(built once in {build:.1f} s = {len(files) / build:.1f} img/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--vae", required=True, type=Path)
    parser.add_argument("--old-root", type=Path, default=None)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--stream-images", type=int, default=None,
                        help="images for the stage 1 streams (default: --images)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(load(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            stage1_streams(args, Path(tmp), r)
        for r in range(args.repeats):
            if args.old_root:
                old_builder(args, Path(tmp) / f"old{r}")
            new_builder(args, Path(tmp) / f"new{r}")
    print(load(), flush=True)


if __name__ == "__main__":
    main()
