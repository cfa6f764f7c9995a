"""``ffhq-ldm bench``: how fast each stage runs here, against the plain fp32 eager baseline
and the project's speed targets.

    ffhq-ldm bench --preset ffhq128-f4 --batch-size 64,256 --json bench.json   # 1 GPU
    ffhq-ldm bench --preset tiny --device cpu                                  # CPU smoke run

Measures, with random weights and random data of the preset's shapes (speed does not depend
on what the weights are), through the code the commands run:
- train-unet  the trainer's UNetTrainStep (stage2.build): DiffusionLoss, clipping, fused AdamW,
              LR schedule, EMA, non-finite guard, from an in-memory latent cache
- train-vae   the trainer's AutoencoderTrainStep (stage1.build): L1 + LPIPS-VGG + KL, PatchGAN
              with the adaptive weight (forced active), and the discriminator's step
- encode      the latent cache builder (stage2.build_cache) on in-memory images
- sample      `ffhq-ldm sample`'s road: sampling.load_pipeline and sampling.sample_images
Each in the plain way (fp32, eager, contiguous, torch.optim defaults: diffusers' example
training defaults) and the fast way (bf16, channels_last, fused AdamW, and torch.compile on
CUDA), the rows the targets read first. Every timing runs after warm-up, between device
synchronisations. FLOPs per image are counted (torch.utils.flop_counter) at batch 1, so each
result also says which fraction of the device's measured matmul peak it reaches. On CUDA also:
peak memory after warm-up (the batch-64 UNet row under a 24 GiB allocator cap, with the
trainer's VAE and a full-size latent cache on the device, plus the CUDA context), the SDPA
backend of the UNet's attention, and a profiler top-10 of the UNet step. Each target gets
pass or fail (n/a on a CPU); the JSON and a markdown copy are rewritten after each row.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .bench_probes import FFHQ_IMAGES
from .bench_targets import GIB, MEMORY_CAP_GIB
from .cli_common import DefaultsHelpFormatter
from .sampling import SAMPLERS

TASKS = ("train-unet", "train-vae", "encode", "sample")

# The project's reference measurements (docs/design.md, "Reference speed"): one H200, bf16
# matmul peak measured at 799 TFLOP/s, paper preset.
REFERENCE_H200 = {
    "source": "docs/design.md, Reference speed (one H200; not measured by this tool)",
    "bf16_matmul_peak_tflops": 799,
    "train-unet": {"fp32 eager, batch 64": 385, "fp32 eager + VAE encode every step, batch 64": 310,
                   "bf16+CL+fused, batch 64": 761, "bf16+CL+fused, batch 256": 1103,
                   "bf16+CL+fused+compile, batch 64": 1284,
                   "bf16+CL+fused+compile, batch 256": 2017},
    "sample": {"fp32 eager, batch 64": 27, "bf16, batch 64": 52, "bf16+compile, batch 64": 114,
               "bf16+compile, batch 256": 133, "bf16+compile+CUDA graphs, batch 256": 137},
    "encode": {"fp32, batch 256": 1559, "bf16+compile, batch 256": 4651},
    "train-vae": {"fp32, batch 32": 155, "bf16, batch 32": 176},
}


# ---------------------------------------------------------------------------------------------
# Command line

def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sorted(set(values))


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--only takes some of {', '.join(TASKS)}; got {text!r}")
    return [t for t in TASKS if t in names]


class _HelpFormatter(DefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, the description's layout kept (as ffhq-ldm's)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="ffhq128-f4", help="configuration preset")
    parser.add_argument("--batch-size", type=_int_list, default="64,256", metavar="B[,B...]",
                        help="batch sizes for train-unet, encode and sample; the plain baseline "
                             "runs at the smallest, torch.compile at the largest")
    parser.add_argument("--vae-batch-size", type=int, default=32,
                        help="batch size of the autoencoder step (as the reference figure in "
                             "docs/design.md)")
    parser.add_argument("--only", type=_task_list, default=",".join(TASKS), metavar="TASKS",
                        help=f"comma-separated tasks to run, of: {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed iterations per training/encoding measurement (sampling times "
                             "max(1, steps // 10) full pipeline calls)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed iterations first (compilation happens here; sampling "
                             "warms up with one call if this is > 0)")
    parser.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                        help="sampler of the fast sampling rows (the baseline is DDIM-50, the "
                             "paper's default); --sampler and --sample-steps are the setting "
                             "the sampling target is read at")
    parser.add_argument("--sample-steps", type=int, default=50,
                        help="denoising steps per sample in the fast sampling rows")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile measurements (they run on CUDA only)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode: default, reduce-overhead, max-autotune, ...")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda if available, else cpu")
    parser.add_argument("--lpips-trunk", default=None, metavar="PATH",
                        help="torchvision VGG16 weights for LPIPS; None: torchvision's cache, "
                             "and without them a random trunk with the same FLOPs")
    parser.add_argument("--max-minutes", type=float, default=6.0,
                        help="start no new measurement after this many minutes (what ran is "
                             "reported, the rest marked skipped); 0: no limit")
    parser.add_argument("--memory-cap-gib", type=float, default=MEMORY_CAP_GIB,
                        help="CUDA: the batch-64 UNet row runs with PyTorch's allocator capped "
                             "at this much of the device (torch.cuda."
                             "set_per_process_memory_fraction), as on a card that size")
    parser.add_argument("--cache-images", type=int, default=FFHQ_IMAGES,
                        help="CUDA: images in the latent cache the capped row keeps on the "
                             "device, as train_unet.py does (each with its mirror)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write every number, the device and the versions here, and the "
                             "tables as markdown beside it (FILE with .md): both rewritten "
                             "after each row, so a cut-off run keeps what it measured")


def register(subparsers) -> None:
    """Add ``bench`` to the ``ffhq-ldm`` command line."""
    p = subparsers.add_parser(
        "bench", help="measure training and sampling speed against the fp32 eager baseline",
        description=__doc__, formatter_class=_HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    from .cli_common import run_main

    parser = argparse.ArgumentParser(prog="ffhq-ldm bench", description=__doc__,
                                     formatter_class=_HelpFormatter)
    add_arguments(parser)
    return run_main(lambda a: run(parser.parse_args(a)), argv)


# ---------------------------------------------------------------------------------------------
# Device plumbing: synchronisation, peak memory, precision flags

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device) -> float | None:
    """Peak bytes the caching allocator handed out since the last reset (CUDA only)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


@contextlib.contextmanager
def _fast_math():
    """ffhq_ldm.speed's global GPU settings for one measurement, restored after it.

    The baseline must run with PyTorch's defaults even when it is measured after a fast run.
    """
    import torch

    from .speed import enable_cudnn_autotune, enable_tf32

    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    enable_tf32()
    enable_cudnn_autotune()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


def count_host_syncs(fn, device) -> int | None:
    """How many times one call of ``fn`` makes the host wait for the GPU (CUDA only).

    PyTorch's sync debug mode warns at every synchronising call (.item(), device-to-host
    copies, ...); the warnings are counted, not raised, so this check can never fail a run.
    """
    import warnings

    import torch

    if device.type != "cuda":
        return None
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def time_per_iteration(fn, warmup: int, iters: int, device) -> float:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``iters`` between two syncs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _matmul_tflops(n: int, dtype, device) -> float:
    """Best of three ~0.15 s windows of n x n matmuls (a busy host only ever slows one down)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)

    def matmul():
        torch.matmul(a, b, out=out)
    once = time_per_iteration(matmul, 1, 1, device)
    iters = max(2, min(500, int(0.15 / max(once, 1e-6))))
    best = min(time_per_iteration(matmul, 0, iters, device) for _ in range(3))
    return 2 * n ** 3 / best / 1e12


def measure_peak_tflops(device) -> dict:
    """The best matmul rate this device reaches: bf16 on CUDA, fp32 on a CPU.

    The same yardstick as "model FLOPs utilisation": a model at 100% would run at the speed of
    one large, perfectly shaped matmul.
    """
    import torch

    if device.type == "cuda":
        dtype, sizes, what = torch.bfloat16, (4096, 8192, 16384), "bf16 matmul (CUDA)"
    else:
        dtype, sizes = torch.float32, (512, 1024, 2048)
        what = "fp32 matmul (CPU: its fp32 peak stands in for a bf16 one)"
    rates = {n: _matmul_tflops(n, dtype, device) for n in sizes}
    best = max(rates, key=rates.get)
    return {"tflops": rates[best], "what": what, "matrix_size": best}


def count_flops(fn) -> float:
    """FLOPs of the matmuls and convolutions ``fn`` runs (forward and/or backward).

    Attention is forced onto the "math" kernel while counting: it is written as matmuls, which
    the counter sees on every device (the fused CPU kernel is not in its table).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------
# What is measured: one builder per task, returning (step function, images per step)

class Bench:
    """Shared settings and random inputs for every measurement of one run."""

    def __init__(self, args, device):
        from .config import get_preset

        self.args, self.device = args, device
        self.unet_config = get_preset(args.preset, "unet")
        self.vae_config = get_preset(args.preset, "vae")
        vc = self.vae_config
        self.latent_shape = (vc.latent_channels, vc.latent_size, vc.latent_size)
        self.resolution = vc.resolution
        self.perceptual_kind = None  # set by build_perceptual()

    # -- models ----------------------------------------------------------------------------------
    def seed(self) -> None:
        import torch

        # Every variant starts from the same random weights: the same model, only run differently.
        torch.manual_seed(self.args.seed)

    def build_unet(self):
        from .models.unet import build_unet

        self.seed()
        unet = build_unet(self.unet_config, self.latent_shape[0], self.latent_shape[1])
        return unet.to(self.device)

    def build_vae(self):
        from .models.vae import build_vae

        self.seed()
        return build_vae(self.vae_config).to(self.device)

    def build_perceptual(self):
        """The real LPIPS-VGG if its ImageNet trunk is on disk, else the random-trunk VGG.

        Both are the same network, so they cost the same FLOPs; which one ran is reported.
        """
        from .losses.perceptual import PerceptualWeightsError, build_perceptual

        try:
            model = build_perceptual("lpips-vgg", self.args.lpips_trunk)
            self.perceptual_kind = "lpips-vgg (ImageNet trunk)"
        except PerceptualWeightsError:
            model = build_perceptual("lpips-vgg-random-trunk")
            self.perceptual_kind = "lpips-vgg-random-trunk (no trunk on disk; same FLOPs)"
        return model.to(self.device)

    def images(self, batch: int):
        import torch

        g = torch.Generator(device="cpu").manual_seed(self.args.seed)
        x = torch.rand((batch, 3, self.resolution, self.resolution), generator=g) * 2 - 1
        return x.to(self.device)

    def latent_cache(self, entries: int):
        """Random posterior means and stds in the cache's float16, as if loaded from disk."""
        import torch

        from .data.latents import STORE_DTYPE, LatentCache

        g = torch.Generator(device="cpu").manual_seed(self.args.seed)
        shape = (entries, *self.latent_shape)
        mean = torch.randn(shape, generator=g).to(STORE_DTYPE)
        std = (0.1 * torch.rand(shape, generator=g)).to(STORE_DTYPE)
        return LatentCache(mean, std, scaling_factor=1.0).to(self.device)

    # -- tasks ---------------------------------------------------------------------------------
    def train_unet(self, fast: bool, compiled: bool, batch: int, cache=None):
        """One UNet optimizer step from ``cache`` (default: a small random one)."""
        import torch

        from .losses.diffusion import DiffusionLoss, draw_global_batch
        from .models.unet import build_train_scheduler
        from .train import stage2
        from .train.ema import EMA

        cfg, device = self.unet_config, self.device
        cache = cache if cache is not None else self.latent_cache(max(1024, 4 * batch))
        counter = itertools.count()

        def draw():
            # exactly the trainer's draw: indices, timesteps and both noises, on the device
            return draw_global_batch(cfg.seed, next(counter), batch, len(cache), self.latent_shape,
                                     cfg.num_train_timesteps, device)

        if fast:
            # the trainer's own step: stage2.build makes what training/train_unet.py runs
            # (fused AdamW, LR schedule, clipping, EMA, non-finite guard), in bf16 autocast
            self.seed()
            parts = stage2.build(None, cfg, self.latent_shape, compile=compiled,
                                 compile_mode=self.args.compile_mode, device=device)
            return (lambda: parts.step(cache, draw())), batch

        # the baseline: diffusers' example training loop (fp32 eager, torch.optim defaults, the
        # loss read back every step), the same UNet, loss and data
        unet = self.build_unet().train()
        loss_fn = DiffusionLoss(build_train_scheduler(cfg).alphas_cumprod, cfg.prediction_type,
                                cfg.snr_gamma).to(device)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      weight_decay=cfg.weight_decay)
        ema = EMA(unet, cfg.ema_decay)

        def step():
            b = draw()
            z = cache.sample(b["indices"], noise=b["latent_noise"])
            loss, _ = loss_fn(unet, z, b["noise"], b["timesteps"])
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(unet)
            loss.item()  # diffusers' example logs the loss every step: one sync per step
        return step, batch

    def _vae_step(self, fast: bool, compiled: bool = False):
        """The trainer's own stage-1 step (stage1.build: the autoencoder's and the
        discriminator's updates, adaptive weight, guard, clipping, fused Adam), in bf16
        autocast when ``fast``, else fp32; compiled through stage1.build's own switch."""
        import torch

        from .train import stage1

        self.seed()
        switch = {"compile": True} if compiled else {}
        return stage1.build(None, self.vae_config, device=self.device,
                            autocast_dtype=torch.bfloat16 if fast else None,
                            perceptual=self.build_perceptual(), **switch).step

    def train_vae(self, fast: bool, compiled: bool, batch: int):
        step = self._vae_step(fast, compiled)
        x = self.images(batch)
        # the discriminator forced active: the step as it runs for most of a real run
        return (lambda: step(x, self.vae_config.disc_start)), batch

    def measure_encode(self, job) -> dict:
        """The latent cache builder itself on ``job.batch``-image shards of in-memory images.

        Fast: ``stage2.build_cache`` as train_unet.py calls it (its own precision, layout,
        compilation and workers). Baseline: ``build_latent_cache`` in fp32 with no workers.
        Each image is encoded with its mirror; both count. The rate is the difference of two
        builds (``warmup`` + ``steps`` shards and ``warmup`` shards, after one warm-up build),
        so the per-call start-up (manifest, DataLoader, compilation if it recurs) drops out.
        """
        import tempfile

        from .data.latents import build_latent_cache
        from .models.vae import LatentCodec
        from .train import stage2

        args, device, batch = self.args, self.device, job.batch
        codec = LatentCodec(self.build_vae().eval().requires_grad_(False))
        small = max(1, args.warmup) * batch
        items = self.pil_rows(small + args.steps * batch)

        def build(n: int, folder: Path) -> float:
            _sync(device)
            start = time.perf_counter()
            if job.fast:
                stage2.build_cache(_CacheRun(device), codec, items[:n], folder, self.resolution,
                                   "image", None, batch)
            else:
                build_latent_cache(codec, items[:n], folder, self.resolution, image_key="image",
                                   batch_size=batch, num_workers=0, device=device,
                                   progress=False)
            _sync(device)
            return time.perf_counter() - start

        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            build(small, Path(tmp) / "warm")
            t_small = build(small, Path(tmp) / "small")
            t_big = build(len(items), Path(tmp) / "big")
        # per shard of `batch` images; a difference lost in timing noise (a loaded host, one
        # shard) would give any rate, so then the whole build's rate stands instead
        if t_big - t_small > 0.2 * t_big:
            seconds, rate_from = (t_big - t_small) / args.steps, "difference of two builds"
        else:
            seconds = t_big / (len(items) // batch)
            rate_from = "whole build (the two builds' difference was within timing noise)"
        return {"images_per_s": 2 * batch / seconds, "seconds_per_iteration": seconds,
                "timed_iterations": args.steps, "warmup_iterations": max(1, args.warmup),
                "whole_build_images_per_s": 2 * len(items) / t_big, "rate_from": rate_from,
                "counts": "encoded images: each image and its mirror", "peak_memory_gib": None}

    def pil_rows(self, n: int) -> list[dict]:
        """``n`` rows of a data set held in memory ({"image": PIL image}), 64 distinct ones."""
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(self.args.seed)
        size = (self.resolution, self.resolution, 3)
        distinct = [Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))
                    for _ in range(min(n, 64))]
        return [{"image": distinct[i % len(distinct)]} for i in range(n)]

    def pipeline_folder(self) -> Path:
        """An exported pipeline of the preset's random-weight models, written once per run."""
        import tempfile

        from pipelines.pipeline_face_ldm import FaceLDMPipeline

        from .models.unet import build_sample_scheduler
        from .train.export import export_pipeline

        if getattr(self, "_pipeline_dir", None) is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
            pipe = FaceLDMPipeline(vae=self.build_vae().cpu().eval(),
                                   unet=self.build_unet().cpu().eval(),
                                   scheduler=build_sample_scheduler(self.unet_config))
            with _diffusers_quiet():
                self._pipeline_dir = export_pipeline(pipe, Path(self._tmp.name) / "pipeline")
        return self._pipeline_dir

    def measure_sample(self, job) -> dict:
        """`ffhq-ldm sample`'s road: ``sampling.load_pipeline`` (bf16 when fast, fp32 for the
        baseline) set up as the command sets it up (channels_last, the UNet compiled in place
        with static shapes), then ``sampling.sample_images``, whose output is the uint8 arrays
        the command writes (PNG writing not timed). Baseline: DDIM-50, the paper's default."""
        from .runtime import diffusers_progress
        from .sampling import load_pipeline, sample_images
        from .speed import channels_last_wanted, maybe_compile, to_channels_last

        args, device = self.args, self.device
        sampler, steps = (args.sampler, args.sample_steps) if job.fast else ("ddim", 50)
        with _diffusers_quiet(), diffusers_progress(False):
            pipe = load_pipeline(str(self.pipeline_folder()), sampler,
                                 "bf16" if job.fast else "fp32", device)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.unet, pipe.vae):
            to_channels_last(module, job.fast and channels_last_wanted(device))
        maybe_compile(pipe.unet, enabled=job.compiled, mode=args.compile_mode, in_place=True)
        decode_compiled = False  # wire here sampling's decode-compile switch, as `sample` sets it
        calls = max(1, args.steps // 10)

        def draw(num: int) -> None:
            for _ in sample_images(pipe, num, seed=args.seed, steps=steps, eta=0.0,
                                   batch_size=job.batch, fixed_batch=job.compiled,
                                   progress=False):
                pass
        if args.warmup > 0:
            draw(job.batch)
        _sync(device)
        start = time.perf_counter()
        draw(calls * job.batch)
        _sync(device)
        seconds = (time.perf_counter() - start) / calls
        return {"images_per_s": job.batch / seconds, "seconds_per_iteration": seconds,
                "timed_iterations": calls, "warmup_iterations": int(args.warmup > 0),
                "sampler": sampler, "sample_steps": steps,
                "unet_calls": len(pipe.scheduler.timesteps), "decode_compiled": decode_compiled,
                "peak_memory_gib": None}

    # -- FLOPs ---------------------------------------------------------------------------------
    def flops(self, tasks) -> dict:
        """GFLOP per image of each task's work, counted at batch 1 on the eager fp32 models."""
        import torch

        from .losses.diffusion import DiffusionLoss
        from .models.unet import build_train_scheduler

        out = {}
        if {"train-unet", "sample"} & set(tasks):
            cfg = self.unet_config
            unet = self.build_unet().train()
            loss_fn = DiffusionLoss(build_train_scheduler(cfg).alphas_cumprod,
                                    cfg.prediction_type).to(self.device)
            z = torch.randn((1, *self.latent_shape), device=self.device)
            t = torch.tensor([cfg.num_train_timesteps // 2], device=self.device)
            held = {}
            fwd = count_flops(lambda: held.update(loss=loss_fn(unet, z, torch.randn_like(z), t)[0]))
            bwd = count_flops(lambda: held["loss"].backward())
            out["unet_forward"] = fwd / 1e9
            out["unet_train_step"] = (fwd + bwd) / 1e9
            del unet, held
        if {"train-vae", "encode", "sample"} & set(tasks):
            if "train-vae" in tasks:
                step, x = self._vae_step(fast=False), self.images(1)
                out["vae_train_step"] = count_flops(
                    lambda: step(x, self.vae_config.disc_start)) / 1e9
            vae = self.build_vae().eval()
            with torch.no_grad():
                x = self.images(1)
                out["encode"] = count_flops(lambda: _encoder(vae)(x)) / 1e9
                z = torch.randn((1, *self.latent_shape), device=self.device)
                out["decode"] = count_flops(lambda: vae.decode(z)) / 1e9
            if "unet_forward" in out:
                # 50 UNet evaluations and one decode; the scheduler's arithmetic is negligible
                out["sample"] = self.args.sample_steps * out["unet_forward"] + out["decode"]
        return {k: round(v, 6) for k, v in out.items()}


def _encoder(vae):
    """``images -> (posterior mean, std)`` as one module, so that it can be compiled whole.

    The class is made here, not at import: ``ffhq-ldm --help`` must not pay for importing torch.
    """
    import torch

    from .models.vae import encode_posterior

    class Encoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            return encode_posterior(self.vae, x)
    return Encoder(vae)


# ---------------------------------------------------------------------------------------------
# The run

FLOPS_KEY = {"train-unet": "unet_train_step", "train-vae": "vae_train_step", "encode": "encode",
             "sample": "sample"}


class _CacheRun:
    """What ``stage2.build_cache`` reads of a training run: the device, the main process,
    ``--no-progress`` and where a scan report would go (none here)."""

    main = True

    def __init__(self, device):
        self.device = device
        self.args = argparse.Namespace(no_progress=True)

    def write_scan_report(self, report) -> None:
        pass


@dataclass(frozen=True)
class Job:
    """One row: a task run one way at one batch size."""
    task: str
    fast: bool
    compiled: bool
    batch: int
    memory_cap: bool = False  # CUDA: the allocator capped, the trainer's residents held
    profile: bool = False  # a profiler top-10 after the timing


def variant_name(task: str, fast: bool, compiled: bool) -> str:
    if not fast:
        return "fp32 eager"
    if task == "encode":
        return "cache builder"  # whatever stage2.build_cache does on this device
    name = "bf16+CL+fused" if task.startswith("train") else "bf16+CL"
    return name + ("+compile" if compiled else "")


def plan(args, device) -> list[Job]:
    """The rows in run order, most important first: what the targets read (the compiled UNet
    step at the largest batch, then at the smallest under the memory cap, the cache builder,
    sampling, the autoencoder step fp32 and compiled), then the other rows and baselines.

    A run cut short by ``--max-minutes`` or a timeout has the target rows. Compilation runs
    on CUDA only (``--no-compile`` to skip it); static shapes: one compilation per row.
    """
    import inspect

    from .train import stage1

    compile_ = device.type == "cuda" and not args.no_compile
    # stage1.build compiles the autoencoder step when it has the switch (train_vae.py's)
    vae_compile = compile_ and "compile" in inspect.signature(stage1.build).parameters
    sizes, vae_batch = args.batch_size, args.vae_batch_size
    small, large = sizes[0], sizes[-1]
    cuda = device.type == "cuda"
    jobs = [Job("train-unet", True, compile_, large, profile=True,
                memory_cap=cuda and small == large),
            Job("train-unet", True, compile_, small, memory_cap=cuda),
            Job("encode", True, False, large),
            Job("sample", True, compile_, large),
            Job("train-vae", False, False, vae_batch),
            Job("train-vae", True, vae_compile, vae_batch),
            Job("attention", True, False, small)]  # which SDPA kernel: not timed
    if compile_:  # the same without compilation
        jobs += [Job("train-unet", True, False, b) for b in reversed(sizes)]
        jobs.append(Job("train-vae", True, False, vae_batch))
    jobs += [Job("train-unet", False, False, small), Job("encode", False, False, small),
             Job("sample", False, False, small)]
    seen, out = set(), []
    for job in jobs:
        key = (job.task, job.fast, job.compiled, job.batch)
        wanted = "train-unet" if job.task == "attention" else job.task
        if wanted in args.only and key not in seen:
            seen.add(key)
            out.append(job)
    return out


SYNC_KEYS = {"train-unet": "host_syncs_per_step"}


def _measure_step(bench: Bench, job: Job) -> dict:
    """A training row: warm-up, then the peak-memory window (CUDA), the timed steps, the host
    syncs of one step and, if asked, a profile."""
    from .bench_probes import read_peak_window, start_peak_window, trainer_residents

    args, device = bench.args, bench.device
    cuda = device.type == "cuda"
    residents = None
    if job.memory_cap:  # what train_unet.py keeps beside the step: the VAE and the whole cache
        residents = trainer_residents(bench.vae_config, bench.latent_shape, device,
                                      args.cache_images)
    extra = {"cache": residents[1]} if residents else {}
    step, images = getattr(bench, job.task.replace("-", "_"))(job.fast, job.compiled, job.batch,
                                                              **extra)
    for _ in range(args.warmup):  # compilation happens here
        step()
    outside = start_peak_window(device) if cuda else 0
    seconds = time_per_iteration(step, 0, args.steps, device)
    out = {"images_per_s": images / seconds, "seconds_per_iteration": seconds,
           "timed_iterations": args.steps, "warmup_iterations": args.warmup,
           **(read_peak_window(device, outside) if cuda else {"peak_memory_gib": None})}
    if residents:
        out["residents"] = {"latent_cache_entries": len(residents[1]),
                            "latent_cache_gib": 2 * residents[1].mean.nbytes / GIB,
                            "vae": "fp32", "cap_gib": args.memory_cap_gib}
    if job.task in SYNC_KEYS:
        syncs = count_host_syncs(step, device)
        if syncs is not None:
            out[SYNC_KEYS[job.task]] = syncs
    if job.profile:
        from .bench_probes import profile_top

        out["profile"] = profile_top(step, device)
    return out


def _measure(bench: Bench, job: Job) -> dict:
    import torch

    from .bench_probes import memory_cap

    scope = _fast_math() if job.fast else contextlib.nullcontext()
    cap = (memory_cap(bench.device, bench.args.memory_cap_gib) if job.memory_cap
           else contextlib.nullcontext())
    try:
        with scope, cap:
            _reset_memory(bench.device)
            if job.task in ("encode", "sample"):
                return getattr(bench, "measure_" + job.task)(job)
            return _measure_step(bench, job)
    finally:
        # drop the compiled graphs and the memory they hold (the cache builder may compile too)
        torch._dynamo.reset()
        _reset_memory(bench.device)


def _attention(bench: Bench) -> dict:
    """The SDPA backends for the UNet's attention at the smallest batch, forward and
    backward in the trainer's precision and layout (bf16 autocast, channels_last on CUDA)."""
    import torch

    from .bench_probes import probe_attention
    from .speed import autocast, channels_last_wanted, to_channels_last

    device = bench.device
    unet = to_channels_last(bench.build_unet().train(), channels_last_wanted(device))
    c, h, _ = bench.latent_shape
    z = torch.randn((bench.args.batch_size[0], c, h, h), device=device)
    t = torch.full((z.shape[0],), 500, device=device)

    def run_once():
        with autocast(device, torch.bfloat16):
            out = unet(z, t).sample
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)
        _sync(device)
    with _fast_math():
        return probe_attention(run_once)


def _device_info(device) -> dict:
    import torch

    info = {"type": device.type}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    memory_gib=props.total_memory / 2 ** 30,
                    capability=f"{props.major}.{props.minor}")
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info.update(name=name, threads=torch.get_num_threads())
    return info


def _versions() -> dict:
    import accelerate
    import diffusers
    import torch

    from . import __version__

    return {"ffhq_ldm": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def _annotate(result: dict, report: dict) -> None:
    """Add FLOP rate, fraction of peak and speed-up over the baseline to one result."""
    ips = result.get("images_per_s")
    if ips is None:
        return
    flops = report["flops_gflop_per_image"]
    gflop = flops.get(FLOPS_KEY[result["task"]])
    if result["task"] == "sample" and "unet_forward" in flops and "decode" in flops:
        # this row's setting: one UNet evaluation per scheduler timestep, then one decode
        gflop = result["unet_calls"] * flops["unet_forward"] + flops["decode"]
    if gflop is not None:
        result["gflop_per_image"] = gflop
        result["achieved_tflops"] = gflop * ips / 1e3
        result["fraction_of_peak"] = result["achieved_tflops"] / report["peak"]["tflops"]
    base = result if result["variant"] == "fp32 eager" else next(
        (r for r in report["results"] if r["task"] == result["task"]
         and r["variant"] == "fp32 eager" and r.get("images_per_s")), None)
    if base is not None:
        result["baseline_batch_size"] = base["batch_size"]
        result["speedup_vs_baseline"] = ips / base["images_per_s"]
    if result["task"] == "train-unet":
        run = report["training_run"]
        result["projected_training_hours"] = run["max_steps"] * run["batch_size"] / ips / 3600


def write_outputs(path, report: dict) -> None:
    """The JSON, and beside it (same name, .md) the tables as markdown; each written whole to a
    temporary name and renamed, so a run killed while writing leaves the last complete pair."""
    if not path:
        return
    import os

    from .io import write_json_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    md = path.with_suffix(".md")
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text(format_markdown(report) + "\n")
    os.replace(tmp, md)


def _run_job(bench: Bench, job: Job, report: dict, start: float) -> dict:
    """One row's result: measured, skipped (time budget) or the error it raised."""
    import traceback

    import torch

    args = bench.args
    result = {"task": job.task, "variant": variant_name(job.task, job.fast, job.compiled),
              "batch_size": job.batch, "compiled": job.compiled, "fast": job.fast}
    elapsed = (time.perf_counter() - start) / 60
    if args.max_minutes and elapsed > args.max_minutes:
        result["skipped"] = f"time budget: {elapsed:.1f} > --max-minutes {args.max_minutes} min"
        return result
    try:
        result.update(_measure(bench, job))
    except Exception as exc:  # one failed row must not lose the others: recorded, run goes on
        traceback.print_exc(file=sys.stderr)
        result["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        torch._dynamo.reset()
        _reset_memory(bench.device)
    return result


def run(args) -> int:
    import torch

    from .bench_targets import judge_all
    from .cli_common import UsageError
    from .sampling import pick_device

    if (args.steps < 1 or args.warmup < 0 or args.sample_steps < 1 or args.vae_batch_size < 1
            or args.cache_images < 1 or args.memory_cap_gib <= 0):
        raise UsageError("--steps, --sample-steps, --vae-batch-size and --cache-images must be "
                         ">= 1, --warmup >= 0, --memory-cap-gib > 0")
    start = time.perf_counter()
    device = pick_device(args.device)
    bench = Bench(args, device)
    report = {
        "preset": args.preset, "device": _device_info(device), "versions": _versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "latent_shape": list(bench.latent_shape), "resolution": bench.resolution,
        # the preset's whole UNet run, for the projected training time of each train-unet rate
        "training_run": {"max_steps": bench.unet_config.max_steps,
                         "batch_size": bench.unet_config.batch_size},
        "reference_h200": REFERENCE_H200, "results": [],
    }
    print(f"ffhq-ldm bench: preset {args.preset} on {device.type} ({report['device']['name']}); "
          f"torch {torch.__version__}, diffusers {report['versions']['diffusers']}", flush=True)
    report["peak"] = measure_peak_tflops(device)
    _log(start, f"peak: {report['peak']['tflops']:.3f} TFLOP/s {report['peak']['what']}")
    report["flops_gflop_per_image"] = bench.flops(args.only)
    _log(start, "FLOPs per image: " + ", ".join(
        f"{k} {v:.4g} GFLOP" for k, v in report["flops_gflop_per_image"].items()))
    for job in plan(args, device):
        if job.task == "attention":
            try:
                report["attention"] = _attention(bench)
            except Exception as exc:  # a diagnosis, never a reason to lose the rows
                report["attention"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            _log(start, "attention: " + json.dumps(report["attention"])[:300])
        else:
            report["results"].append(_run_job(bench, job, report, start))
            _log(start, _one_line(report["results"][-1]))
        for result in report["results"]:  # a baseline measured later gives earlier rows theirs
            _annotate(result, report)
        report["targets"] = judge_all(report["results"], device.type == "cuda")
        report["perceptual"] = bench.perceptual_kind
        report["wall_seconds"] = time.perf_counter() - start
        write_outputs(args.json, report)
    print()
    print(format_table(report))
    if args.json:
        print(f"\nwrote {args.json} and {Path(args.json).with_suffix('.md')}")
    return 1 if any("error" in r for r in report["results"]) else 0


# ---------------------------------------------------------------------------------------------
# Output

def _log(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)


def _one_line(r: dict) -> str:
    head = f"{r['task']} {r['variant']} batch {r['batch_size']}: "
    if "images_per_s" in r:
        return head + f"{r['images_per_s']:.4g} img/s"
    return head + r.get("error", r.get("skipped", "?"))


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def row_verdicts(result: dict, report: dict) -> str:
    """The verdicts of the targets read from this row ("" if none is)."""
    from .bench_targets import TARGETS

    verdicts = {line["target"]: line["verdict"] for line in report.get("targets", [])}
    return "; ".join(verdicts[t.name] for t in TARGETS
                     if t.row.matches(result) and t.name in verdicts)


def _memory_cell(r: dict) -> str:
    """Peak memory: with what lies outside the allocator where it was read (CUDA), else n/a."""
    if r.get("peak_total_gib") is not None:
        return f"{r['peak_total_gib']:.1f} GiB"
    return "n/a" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f} GiB"


COLUMNS = ("task", "variant", "batch", "img/s", "x base", "TFLOP/s", "of peak", "peak mem",
           "syncs", "target")


def _cells(r: dict, report: dict) -> list[str]:
    head = [r["task"], r["variant"], str(r["batch_size"])]
    if "images_per_s" not in r:
        why = r.get("error") or r.get("skipped") or "?"
        return head + [why] + [""] * 5 + [row_verdicts(r, report)]
    share = 100 * r["fraction_of_peak"] if "fraction_of_peak" in r else None
    return head + [_fmt(r["images_per_s"], ".4g"),
                   _fmt(r.get("speedup_vs_baseline"), ".2f") + "x",
                   _fmt(r.get("achieved_tflops"), ".4g"), _fmt(share, ".1f") + "%",
                   _memory_cell(r), _fmt(r.get(SYNC_KEYS.get(r["task"], "")), "d", "-"),
                   row_verdicts(r, report)]


def _header_lines(report: dict) -> list[str]:
    dev, peak, flops = report["device"], report["peak"], report["flops_gflop_per_image"]
    lines = [f"device: {dev['name']} ({dev['type']}"
             + (f", {dev['threads']} threads)" if "threads" in dev else ")"),
             (f"peak:   {peak['tflops']:.3f} TFLOP/s, {peak['what']}, measured "
              f"({peak['matrix_size']}^3)"),
             "FLOPs:  per image, counted at batch 1: " + ", ".join(
                 f"{k.replace('_', ' ')} {v:.4g} GFLOP" for k, v in flops.items())]
    if report.get("perceptual"):
        lines.append(f"LPIPS:  {report['perceptual']}")
    return lines


LEGEND = ("x base: images/s over the fp32 eager baseline's (run at the smallest batch). of peak: "
          "model FLOPs/s over the measured matmul peak. peak mem (CUDA): after warm-up, the "
          "allocator's peak reserved bytes plus what the device holds outside it (CUDA "
          "context, libraries). syncs (CUDA): times the host waits for the GPU in one training "
          "step. encode: the latent cache builder, each image and its mirror counted. sample: "
          "`ffhq-ldm sample`'s road at the row's sampler and steps.")


def _details(report: dict) -> list[str]:
    """The sampling setting, the attention probe, the profile and the projection."""
    from .bench_probes import format_attention, format_profile

    lines = []
    for r in report["results"]:
        if r["task"] == "sample" and "sampler" in r:
            lines.append(f"sample {r['variant']} batch {r['batch_size']}: {r['sampler']}, "
                         f"{r['sample_steps']} steps ({r['unet_calls']} UNet calls), VAE decode "
                         f"{'compiled' if r['decode_compiled'] else 'eager'}")
    if "attention" in report:
        att = report["attention"]
        lines.append(att["error"] if "error" in att else format_attention(att))
    for r in report["results"]:
        if "profile" in r:
            lines.append(f"{r['task']} {r['variant']} batch {r['batch_size']}, "
                         + format_profile(r["profile"]))
    best = max((r for r in report["results"] if r["task"] == "train-unet" and "images_per_s" in r),
               key=lambda r: r["images_per_s"], default=None)
    if best is not None:
        run = report["training_run"]
        hours = best["projected_training_hours"]
        lines.append(f"train-unet: the preset's {run['max_steps']} steps x batch "
                     f"{run['batch_size']} at {best['images_per_s']:.4g} img/s "
                     f"({best['variant']}, batch {best['batch_size']}) would take {hours:.3g} h.")
    return lines


def format_table(report: dict) -> str:
    from .bench_targets import format_targets

    widths = (11, 24, 6, 10, 8, 10, 9, 10, 7)
    header = "".join(c.ljust(w) if j < 2 else c.rjust(w)
                     for j, (c, w) in enumerate(zip(COLUMNS, widths, strict=False)))
    text = [header + "  target", "-" * (len(header) + 8)]
    for r in report["results"]:
        cells = _cells(r, report)
        head = "".join(c.ljust(w) if j < 2 else c.rjust(w)
                       for j, (c, w) in enumerate(zip(cells[:3], widths, strict=False)))
        if "images_per_s" not in r:  # the reason it did not run, then its verdict
            text.append(f"{head}  {cells[3]}" + (f"  [{cells[-1]}]" if cells[-1] else ""))
            continue
        text.append(head + "".join(c.rjust(w) for c, w in zip(cells[3:9], widths[3:],
                                                               strict=True))
                    + ("  " + cells[-1] if cells[-1] else ""))
    return "\n".join(_header_lines(report) + [""] + text + ["", LEGEND, ""]
                     + ["targets:", format_targets(report.get("targets", [])), ""]
                     + _details(report))


def format_markdown(report: dict) -> str:
    """The same tables in markdown, for the partial-results file beside the JSON."""
    from .bench_targets import format_targets

    lines = ["# ffhq-ldm bench", "", *[f"    {h}" for h in _header_lines(report)], "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r, report)) + " |" for r in report["results"]]
    lines += ["", LEGEND, "", "## Targets", "", format_targets(report.get("targets", [])), ""]
    details = _details(report)
    if details:
        lines += ["## Details", "", "```", *details, "```"]
    lines.append(f"\n{len(report['results'])} rows, {report.get('wall_seconds', 0):.0f} s so far.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
