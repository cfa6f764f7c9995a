"""Stage 2's parts, built once for ``training/train_unet.py`` and ``ffhq-ldm bench`` alike: the
UNet with its loss, optimiser, LR schedule, EMA and non-finite guard wrapped in one
``UNetTrainStep``; the global batches; the latent cache build; previews and exports."""

from __future__ import annotations

import copy
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..losses.diffusion import DiffusionLoss, draw_global_batch, slice_for
from ..models.unet import build_sample_scheduler, build_train_scheduler, build_unet
from ..speed import channels_last_wanted, maybe_compile, to_channels_last
from .ema import EMA
from .steps import UNetTrainStep, make_guard, unet_optimizer, warmup_lambda


@dataclass
class UNetParts:
    unet: torch.nn.Module  # what accelerate prepared (saved, clipped, stepped)
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    ema: EMA
    guard: object  # resilience.NonFiniteGuard
    step: UNetTrainStep
    speed: dict


def build(run, config, latent_shape: tuple, *, compile: bool | None = None,
          compile_mode: str | None = None, max_nonfinite: int = 20, accelerator=None,
          device=None) -> UNetParts:
    """The UNet and everything its optimizer step needs, on ``run``'s accelerator (or, with
    ``run=None``, on ``device`` in plain PyTorch with bf16 autocast: the bench). ``compile``:
    torch.compile the training forward (None: on CUDA only, see ``speed.compile_wanted``)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    acc = run.accelerator if run is not None else accelerator
    device = torch.device(run.device if run is not None else device)
    # Seeded here, not only at the start: building the cache draws from the global RNG (a data
    # loader's base seed), and the initial weights must not depend on whether it was built.
    set_seed(config.seed)
    # NHWC weights on CUDA, the layout tensor-core convolutions run in (state_dict unchanged)
    channels_last = channels_last_wanted(device)
    unet = to_channels_last(build_unet(config, latent_shape[0], latent_shape[1]), channels_last)
    unet.to(device)
    loss_fn = DiffusionLoss(build_train_scheduler(config).alphas_cumprod, config.prediction_type,
                            config.snr_gamma).to(device)
    opt = unet_optimizer(config, unet, device)
    # Stepped once per optimizer step by the step (not by accelerate, which would step it once
    # per process): the schedule's length is the same for any process layout.
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(config.warmup_steps))
    if acc is not None:
        unet, opt = acc.prepare(unet, opt)
    plain = acc.unwrap_model(unet) if acc is not None else unet
    ema = EMA(plain, config.ema_decay)
    guard = make_guard(max_nonfinite, device, opt, acc,
                       write=lambda text: tqdm.write(text, file=sys.stderr))
    # Only the forward is compiled: `unet` stays what accelerate saves and clips, and its
    # unwrapped module is what the EMA follows. Not twice if accelerate's config compiled it.
    compiled = hasattr(unet, "_orig_mod")
    forward = unet
    if not compiled:
        forward = maybe_compile(unet, enabled=compile, mode=compile_mode)
        compiled = forward is not unet
    step = UNetTrainStep(unet, loss_fn, opt, ema=ema, ema_model=plain, forward=forward,
                         lr_scheduler=lr_sched, grad_clip=config.grad_clip, accelerator=acc,
                         guard=guard)
    speed = {"mixed_precision": acc.mixed_precision if acc is not None else "bf16",
             "channels_last": channels_last, "fused_adamw": bool(opt.defaults.get("fused")),
             "compiled": compiled,
             "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
    return UNetParts(unet, opt, lr_sched, ema, guard, step, speed)


class UNetLoop:
    """What ``Run.loop`` calls for the UNet: the step on this process's share of each global
    batch, the log values (the mean loss between log lines, summed on the device over finite
    steps: the loop's only host read), and the checkpoint."""

    def __init__(self, run, parts: UNetParts, cache, micro_batch: int, accumulation: int,
                 global_batch: int, posthoc=None):
        self.run, self.parts, self.cache, self.posthoc = run, parts, cache, posthoc
        self.micro_batch, self.accumulation, self.global_batch = (micro_batch, accumulation,
                                                                  global_batch)
        self.window = torch.zeros(2, device=run.device)  # (loss sum, finite steps)

    def load_state(self, state: dict | None) -> None:
        """The resumed checkpoint's log window (and post-hoc EMA profiles)."""
        if state is not None:
            self.window[0] = state["log_window"]["loss_sum"]
            self.window[1] = state["log_window"]["count"]
            if self.posthoc is not None:
                self.posthoc.load(self.run.resumed_from)
        if self.posthoc is not None and self.run.main:
            self.posthoc.prune(self.run.out, self.run.step)  # snapshots past the checkpoint

    def step(self, batch: dict):
        # forward, backward, clipping, AdamW, LR schedule and EMA, all queued on the device;
        # a non-finite loss or gradient skips the optimizer step and the EMA update
        slices = micro_batches(batch, self.micro_batch, self.run, self.accumulation)
        result = self.parts.step(self.cache, slices)
        if self.posthoc is not None:  # the power-function profiles, gated like the EMA
            self.posthoc.update(self.parts.step.ema_model, enabled=~result.skipped)
        self.window[0] += torch.where(result.skipped, 0.0, result.loss)
        self.window[1] += (~result.skipped).float()
        return result, self.global_batch

    def log_values(self, result, images_per_s: float) -> dict:
        from .run import device_memory, scalars

        run, parts = self.run, self.parts
        total = run.accelerator.reduce(self.window[0], "mean").item()
        count = self.window[1].item()
        self.window.zero_()
        values = {"loss": total / count if count else float("nan"),
                  "lr": parts.lr_sched.get_last_lr()[0], "images_per_s": images_per_s,
                  "images_seen": run.images_seen, "ema_decay": parts.ema.current_decay(),
                  **scalars(result.logs), **device_memory(run.device)}
        if result.grad_norm is not None:
            values["grad_norm"] = float(result.grad_norm)
        return values

    def checkpoint(self) -> Path:
        # the log window is averaged over processes, so every rank resumes with the same one
        parts = self.parts
        mean = self.run.accelerator.reduce(self.window[0].clone(), "mean")
        return self.run.save_checkpoint(
            {"nonfinite": parts.guard.state_dict(),
             "log_window": {"loss_sum": mean.item(), "count": self.window[1].item()}},
            models={"unet": parts.unet}, optimizers={"unet": parts.opt},
            schedulers={"lr": parts.lr_sched}, ema=parts.ema,
            extras=[self.posthoc] if self.posthoc is not None else [])

    def snapshot(self, step: int) -> None:
        """A post-hoc EMA snapshot when one is due (main process)."""
        if self.posthoc is not None and self.run.main:
            self.posthoc.maybe_snapshot(step, self.run.out,
                                        final=step == self.run.config.max_steps)


def batch_stream(run, config, global_batch: int, num_entries: int, latent_shape: tuple):
    """Endless global batches from the current step on: each a function of (seed, step), so a
    run draws the same ones whatever its process layout, and a resumed run continues them."""
    for step in itertools.count(run.step):
        yield draw_global_batch(config.seed, step, global_batch, num_entries, latent_shape,
                                config.num_train_timesteps, run.device)


def micro_batches(batch: dict, micro_batch: int, run, accumulation: int) -> list[dict]:
    """This process's share of a global batch, one entry per accumulation round."""
    return [slice_for(batch, micro_batch, r, run.accelerator.process_index, run.procs)
            for r in range(accumulation)]


def build_cache(run, codec, items, cache_dir: Path, resolution: int, image_key, report,
                batch_size: int | None) -> None:
    """Encode every training image and its mirror once (main process), listing what failed."""
    from ..data.images import load_failures
    from ..data.latents import build_latent_cache

    # the fast path: bf16, channels_last and compiled on CUDA (not with --no-compile)
    build_latent_cache(codec, items, cache_dir, resolution, image_key=image_key,
                       batch_size=batch_size, device=run.device,
                       compile=False if getattr(run.args, "no_compile", False) else None,
                       progress=not run.args.no_progress)
    failures = load_failures()  # images that failed to decode while encoding
    if failures and report is not None and report.add_load_failures(failures):
        run.write_scan_report(report)


def cache_fingerprint(cache_dir: Path) -> str:
    """The autoencoder fingerprint the cache was built with (the run's resume key)."""
    return json.loads((Path(cache_dir) / "manifest.json").read_text())["vae_fingerprint"]


class Exporter:
    """Previews and the pipeline folder, with the EMA weights (main process only): at every
    ``preview_every`` steps and every checkpoint, and once at the end if the run resumed there."""

    def __init__(self, run, vae, parts: UNetParts, config, latent_shape: tuple,
                 global_batch: int):
        self.run, self.vae, self.parts, self.config = run, vae, parts, config
        self.latent_shape, self.global_batch = latent_shape, global_batch
        self.ema_unet = copy.deepcopy(run.accelerator.unwrap_model(parts.unet)).eval()
        self.ema_unet.requires_grad_(False)
        self.exported = run.step if run.step < config.max_steps else None

    def on_step(self, step: int, is_checkpoint: bool) -> None:
        if self.run.main and (step % self.config.preview_every == 0 or is_checkpoint):
            self.export(step)

    def finish(self) -> None:
        if self.run.main and self.exported != self.run.step:
            self.export(self.run.step)

    def export(self, step: int) -> Path:
        from pipelines.pipeline_face_ldm import FaceLDMPipeline

        from ..sampling import sample_images
        from ..visual import save_grid
        from .export import export_pipeline

        run, config = self.run, self.config
        self.parts.ema.copy_to(self.ema_unet)
        pipe = FaceLDMPipeline(vae=self.vae, unet=self.ema_unet,
                               scheduler=build_sample_scheduler(config))
        pipe.set_progress_bar_config(disable=True)
        # the same starting noises at every preview, through the one sampling road
        _, images = next(sample_images(pipe, config.preview_images, seed=PREVIEW_SEED,
                                       steps=config.preview_steps,
                                       batch_size=config.preview_images, progress=False))
        grid = save_grid(images, run.out / "previews" / f"step-{step:08d}.png")
        writer = run.tracker_writer()
        if writer is not None:
            writer.add_images("preview", images, step, dataformats="NHWC")
        card = {"data": run.args.data, "preset": run.args.preset, "step": step,
                "batch_size": self.global_batch, "images_seen": run.images_seen,
                "ema_decay": config.ema_decay}
        export_pipeline(pipe, run.out / "pipeline", card)
        self.exported = step
        return grid


PREVIEW_SEED = 1234  # previews show images 0.. of this seed at every step
