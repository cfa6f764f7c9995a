"""``ffhq-ldm bench``: how fast each stage runs here, against the plain fp32 eager baseline.

    ffhq-ldm bench --preset ffhq128-f4 --batch-size 64,256 --json bench.json   # 1 GPU, ~5-7 min
    ffhq-ldm bench --preset tiny --device cpu                                  # CPU smoke run

Measures, with random weights and random data of the preset's shapes (speed does not depend
on what the weights are):
- train-unet  one UNet optimizer step from an in-memory latent cache: DiffusionLoss, grad
              clipping, AdamW, EMA (what training/train_unet.py does per step)
- train-vae   one autoencoder step with the full loss: L1 + LPIPS-VGG + KL, PatchGAN with the
              adaptive weight (forced active), and the discriminator's step
- train-vae-ldm  the same step with the adaptive weight computed as LDM's code does (two
              autograd.grad calls through LPIPS and PatchGAN, then the full backward), eager:
              what train-vae's single pass saves
- encode      posterior mean and std of a batch of images (the latent-cache builder's work)
- sample      FaceLDMPipeline: DDIM-50 and VAE decode, per image
Each in the plain way (fp32, eager, contiguous, torch.optim defaults: diffusers' example
training defaults) and the fast way of ffhq_ldm.speed (bf16, channels_last, fused AdamW, and
torch.compile on CUDA). Every timing runs after warm-up, between device synchronisations.
FLOPs per image are counted (torch.utils.flop_counter) at batch 1, so each result also says
which fraction of the device's measured matmul peak it reaches.
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
from pathlib import Path

from .cli_common import DefaultsHelpFormatter

TASKS = ("train-unet", "train-vae", "train-vae-ldm", "encode", "sample")
# Compiled at the largest batch (the autoencoder step at --vae-batch-size), in this order (the
# budget may cut the last one): the training steps and sampling matter most for a run's wall time.
COMPILED_TASKS = ("train-unet", "train-vae", "sample", "encode")

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
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per sample")
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
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and data")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write every number, the device and the versions here (rewritten "
                             "after each measurement, so a cut-off run keeps what it measured)")


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
    def train_unet(self, fast: bool, compiled: bool, batch: int):
        import torch

        from .losses.diffusion import DiffusionLoss, draw_global_batch
        from .models.unet import build_train_scheduler
        from .train import stage2
        from .train.ema import EMA

        cfg, device = self.unet_config, self.device
        cache = self.latent_cache(max(1024, 4 * batch))
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

    def _vae_step(self, fast: bool, compiled: bool = False, ldm_reference: bool = False):
        """The trainer's own stage-1 step (stage1.build: the autoencoder's and the
        discriminator's updates, adaptive weight, guard, clipping, fused Adam), in bf16
        autocast when ``fast``, else fp32; ``ldm_reference``: LDM's adaptive weight."""
        import torch

        from .train import stage1

        self.seed()
        return stage1.build(None, self.vae_config, device=self.device,
                            autocast_dtype=torch.bfloat16 if fast else None,
                            perceptual=self.build_perceptual(), compile=compiled,
                            compile_mode=self.args.compile_mode,
                            ldm_reference=ldm_reference).step

    def train_vae(self, fast: bool, compiled: bool, batch: int, ldm_reference: bool = False):
        step = self._vae_step(fast, compiled, ldm_reference)
        x = self.images(batch)
        # the discriminator forced active: the step as it runs for most of a real run
        return (lambda: step(x, self.vae_config.disc_start)), batch

    def train_vae_ldm(self, fast: bool, compiled: bool, batch: int):
        return self.train_vae(fast, False, batch, ldm_reference=True)

    def encode(self, fast: bool, compiled: bool, batch: int):
        import torch

        from .speed import autocast, maybe_compile, to_channels_last

        vae = self.build_vae().eval().requires_grad_(False)
        encoder = _encoder(vae)
        if fast:
            to_channels_last(vae)
            encoder = maybe_compile(encoder, enabled=compiled, mode=self.args.compile_mode)
        x = self.images(batch)
        dtype = torch.bfloat16 if fast else None

        @torch.no_grad()
        def step():
            with autocast(self.device, dtype):
                encoder(x)
        return step, batch

    def sample(self, fast: bool, compiled: bool, batch: int):
        import torch

        from pipelines.pipeline_face_ldm import FaceLDMPipeline

        from .models.unet import build_sample_scheduler
        from .speed import maybe_compile, to_channels_last

        unet = self.build_unet().eval().requires_grad_(False)
        vae = self.build_vae().eval().requires_grad_(False)
        if fast:
            # bf16 weights, as `ffhq-ldm sample --dtype bf16` loads them (no autocast needed).
            # diffusers warns on every such cast that no module must stay fp32 here: silenced.
            with _diffusers_quiet():
                for module in (unet, vae):
                    to_channels_last(module.to(torch.bfloat16))
            # in place: the pipeline keeps a plain UNet2DModel (type, config, dtype unchanged).
            # Only the UNet: it runs 50 times per image, the decoder once.
            maybe_compile(unet, enabled=compiled, mode=self.args.compile_mode, in_place=True)
        scheduler = build_sample_scheduler(self.unet_config)
        pipe = FaceLDMPipeline(vae=vae, unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)

        def step():
            # "pt" keeps the images on the device: the host-side PNG conversion is not timed
            pipe(batch_size=batch, num_inference_steps=self.args.sample_steps, output_type="pt")
        return step, batch

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
        if {"train-vae", "train-vae-ldm", "encode", "sample"} & set(tasks):
            for task, key in (("train-vae", "vae_train_step"),
                              ("train-vae-ldm", "vae_train_step_ldm")):
                if task in tasks:
                    step = self._vae_step(fast=False, ldm_reference=task == "train-vae-ldm")
                    x = self.images(1)
                    out[key] = count_flops(
                        lambda s=step, x=x: s(x, self.vae_config.disc_start)) / 1e9
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

FLOPS_KEY = {"train-unet": "unet_train_step", "train-vae": "vae_train_step",
             "train-vae-ldm": "vae_train_step_ldm", "encode": "encode", "sample": "sample"}


def variant_name(task: str, fast: bool, compiled: bool) -> str:
    if not fast:
        return "fp32 eager"
    name = "bf16+CL+fused" if task.startswith("train") else "bf16+CL"
    return name + ("+compile" if compiled else "")


def plan(args, device) -> list[tuple[str, bool, bool, int]]:
    """(task, fast, compiled, batch) in run order: every eager measurement before any compiled one.

    Compilation is the slow, uncertain part; if it runs long, the eager numbers are already in.
    Static shapes mean one compilation per batch size, so only the largest batch is compiled.
    """
    jobs = []
    for task in args.only:
        sizes = [args.vae_batch_size] if task.startswith("train-vae") else args.batch_size
        jobs.append((task, False, False, sizes[0]))
        jobs += [(task, True, False, b) for b in sizes]
    if device.type == "cuda" and not args.no_compile:
        jobs += [(t, True, True, args.vae_batch_size if t == "train-vae" else args.batch_size[-1])
                 for t in COMPILED_TASKS if t in args.only]
    return jobs


SYNC_KEYS = {"train-unet": "host_syncs_per_step", "sample": "host_syncs_per_call"}


def _measure(bench: Bench, task: str, fast: bool, compiled: bool, batch: int) -> dict:
    import torch

    args, device = bench.args, bench.device
    if task == "sample":
        warmup, iters = (1 if args.warmup > 0 else 0), max(1, args.steps // 10)
    else:
        warmup, iters = args.warmup, args.steps
    scope = _fast_math() if fast else contextlib.nullcontext()
    with scope:
        _reset_memory(device)
        step, images = getattr(bench, task.replace("-", "_"))(fast, compiled, batch)
        seconds = time_per_iteration(step, warmup, iters, device)
        peak = _peak_memory_gib(device)
        # per training step, or per pipeline call (all its denoising steps and the decode)
        syncs = count_host_syncs(step, device) if task in ("train-unet", "sample") else None
    del step
    if compiled:
        torch._dynamo.reset()  # drop the compiled graphs and the memory they hold
    _reset_memory(device)
    return {"images_per_s": images / seconds, "seconds_per_iteration": seconds,
            "timed_iterations": iters, "warmup_iterations": warmup, "peak_memory_gib": peak,
            **({} if syncs is None else {SYNC_KEYS[task]: syncs})}


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
    gflop = report["flops_gflop_per_image"].get(FLOPS_KEY[result["task"]])
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


def _write_json(path, report: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def run(args) -> int:
    import torch

    from .cli_common import UsageError
    from .sampling import pick_device

    if args.steps < 1 or args.warmup < 0 or args.sample_steps < 1 or args.vae_batch_size < 1:
        raise UsageError("--steps, --sample-steps and --vae-batch-size must be >= 1, --warmup >= 0")
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
        "reference_h200": REFERENCE_H200,
    }
    print(f"ffhq-ldm bench: preset {args.preset} on {device.type} ({report['device']['name']}); "
          f"torch {torch.__version__}, diffusers {report['versions']['diffusers']}", flush=True)

    report["peak"] = measure_peak_tflops(device)
    _log(start, f"peak: {report['peak']['tflops']:.3f} TFLOP/s {report['peak']['what']}")
    report["flops_gflop_per_image"] = bench.flops(args.only)
    _log(start, "FLOPs per image: " + ", ".join(
        f"{k} {v:.4g} GFLOP" for k, v in report["flops_gflop_per_image"].items()))
    report["results"] = []
    failures = 0
    for task, fast, compiled, batch in plan(args, device):
        result = {"task": task, "variant": variant_name(task, fast, compiled), "batch_size": batch,
                  "compiled": compiled}
        elapsed = (time.perf_counter() - start) / 60
        if args.max_minutes and elapsed > args.max_minutes:
            result["skipped"] = f"time budget: {elapsed:.1f} > --max-minutes {args.max_minutes}"
        else:
            try:
                result.update(_measure(bench, task, fast, compiled, batch))
            except Exception as exc:  # one failed measurement must not lose the others
                if not (compiled or isinstance(exc, torch.OutOfMemoryError)):
                    raise
                failures += 1
                result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                torch._dynamo.reset()
                _reset_memory(device)
        _annotate(result, report)
        report["results"].append(result)
        _log(start, _one_line(result))
        report["perceptual"] = bench.perceptual_kind
        report["wall_seconds"] = time.perf_counter() - start
        _write_json(args.json, report)
    print()
    print(format_table(report))
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if failures else 0


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


def format_table(report: dict) -> str:
    dev, peak, flops = report["device"], report["peak"], report["flops_gflop_per_image"]
    lines = [f"device: {dev['name']} ({dev['type']}"
             + (f", {dev['threads']} threads)" if "threads" in dev else ")"),
             (f"peak:   {peak['tflops']:.3f} TFLOP/s, {peak['what']}, measured "
              f"({peak['matrix_size']}^3)"),
             "FLOPs:  per image, counted at batch 1: " + ", ".join(
                 f"{k.replace('_', ' ')} {v:.4g} GFLOP" for k, v in flops.items())]
    if report.get("perceptual"):
        lines.append(f"LPIPS:  {report['perceptual']}")
    header = (f"{'task':<14}{'variant':<24}{'batch':>6}{'img/s':>10}{'x base':>8}"
              f"{'TFLOP/s':>10}{'of peak':>9}{'peak mem':>10}{'syncs':>7}")
    lines += ["", header, "-" * len(header)]
    for r in report["results"]:
        if "images_per_s" not in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"{r['task']:<14}{r['variant']:<24}{r['batch_size']:>6}  {why}")
            continue
        mem = _fmt(r.get("peak_memory_gib"), ".1f", "n/a")
        share = 100 * r["fraction_of_peak"] if "fraction_of_peak" in r else None
        lines.append(
            f"{r['task']:<14}{r['variant']:<24}{r['batch_size']:>6}"
            f"{_fmt(r['images_per_s'], '.4g'):>10}"
            f"{_fmt(r.get('speedup_vs_baseline'), '.2f') + 'x':>8}"
            f"{_fmt(r.get('achieved_tflops'), '.4g'):>10}"
            f"{_fmt(share, '.1f') + '%':>9}"
            f"{mem + (' GiB' if mem != 'n/a' else ''):>10}"
            f"{_fmt(r.get(SYNC_KEYS.get(r['task'], '')), 'd', '-'):>7}")
    lines.append("")
    lines.append("x base: images/s over the fp32 eager baseline's (run at the smallest batch). "
                 "of peak: model FLOPs/s over the measured matmul peak. syncs (CUDA): times "
                 "the host waits for the GPU in one training step or one pipeline call.")
    best = max((r for r in report["results"] if r["task"] == "train-unet" and "images_per_s" in r),
               key=lambda r: r["images_per_s"], default=None)
    if best is not None:
        run = report["training_run"]
        lines.append(f"train-unet: the preset's {run['max_steps']} steps x batch "
                     f"{run['batch_size']} at "
                     f"{best['images_per_s']:.4g} img/s ({best['variant']}, batch "
                     f"{best['batch_size']}) would take {best['projected_training_hours']:.3g} h.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
