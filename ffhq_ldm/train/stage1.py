"""Stage 1's parts, built once for ``training/train_vae.py`` and ``ffhq-ldm bench`` alike: the
autoencoder, PatchGAN and LPIPS with their optimisers and non-finite guard in one
``AutoencoderTrainStep``; the replayable data stream; held-out evaluation (PSNR/SSIM/LPIPS,
rFID); the export with the measured latent scale."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.images import ImageDataset
from ..data.scan import ScanReport, inspect_image
from ..losses.autoencoder import AutoencoderLoss
from ..losses.perceptual import build_perceptual
from ..models.discriminator import PatchDiscriminator
from ..models.vae import Reconstructor, build_vae
from ..speed import channels_last_wanted, to_channels_last
from .steps import AutoencoderTrainStep, autoencoder_optimizers, make_guard


class FlipEncoded(torch.utils.data.Dataset):
    """Index ``i + n`` is image ``i`` mirrored: the sampler decides flips, so order is replayable.

    Yields ``(image, requested index, index used)``: the two differ when the requested file
    failed to decode and the next one stood in (in a worker process, where the main process
    cannot see it otherwise).
    """

    def __init__(self, items, size, image_key):
        self.plain = ImageDataset(items, size, flip="none", image_key=image_key)

    def __len__(self):
        return len(self.plain)

    def __getitem__(self, index):
        n = len(self.plain)
        x, used = self.plain.get(index % n)
        return (x.flip(-1) if index >= n else x), index % n, used


def stand_ins(requested, used, dataset: ImageDataset, size: int, report: ScanReport) -> dict:
    """{file: reason} for files that failed in a worker: requested .. used (exclusive)."""
    known = {entry["file"] for entry in report.load_failures}
    failures = {}
    for r, u in zip(requested.tolist(), used.tolist(), strict=False):
        j = r
        while j != u:
            name = dataset.name(j)
            if report.relative(name) not in known:
                reason = "fails to decode" if dataset.image_key else \
                    inspect_image(name, size, full=True)[1] or "failed to decode while loading"
                failures[name] = reason
            j = (j + 1) % len(dataset)
    return failures


@dataclass
class AutoencoderParts:
    vae: torch.nn.Module  # the plain autoencoder (exported at the end)
    recon: torch.nn.Module  # Reconstructor(vae), as accelerate prepared it
    disc: torch.nn.Module
    perceptual: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    guard: object  # resilience.NonFiniteGuard
    step: AutoencoderTrainStep
    speed: dict


def build(run, config, *, lpips_trunk: str | None = None, max_nonfinite: int = 20,
          accelerator=None, device=None, autocast_dtype=None,
          perceptual: torch.nn.Module | None = None, compile: bool | None = None,
          compile_mode: str | None = None, ldm_reference: bool = False) -> AutoencoderParts:
    """The autoencoder and everything its step needs, on ``run``'s accelerator (or, with
    ``run=None``, on ``device`` in plain PyTorch with ``autocast_dtype``: the bench, which
    also passes its own ``perceptual`` network). ``compile``: torch.compile the step's
    networks (None: on CUDA only, see ``speed.compile_wanted``); ``ldm_reference``: the
    adaptive weight computed as LDM's code does, eager (see ``AutoencoderTrainStep``)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    acc = run.accelerator if run is not None else accelerator
    device = torch.device(run.device if run is not None else device)
    set_seed(config.seed)  # initial weights from the seed alone, whatever ran before
    if perceptual is None:
        perceptual = build_perceptual(config.perceptual, lpips_trunk)  # fails early offline
    # NHWC weights on CUDA, the layout tensor-core convolutions run in (state_dict unchanged)
    channels_last = channels_last_wanted(device)
    vae = to_channels_last(build_vae(config), channels_last).to(device)
    recon = Reconstructor(vae)
    disc = to_channels_last(PatchDiscriminator(3, config.disc_channels, config.disc_layers),
                            channels_last).to(device)
    loss_fn = AutoencoderLoss(config, perceptual, disc)
    opt_g, opt_d = autoencoder_optimizers(config, vae, disc, device)
    if acc is not None:
        recon, disc, opt_g, opt_d = acc.prepare(recon, disc, opt_g, opt_d)
        loss_fn.discriminator = disc
    if perceptual is not None:
        to_channels_last(perceptual.to(device), channels_last)
    guard = make_guard(max_nonfinite, device, opt_g, acc,
                       write=lambda text: tqdm.write(text, file=sys.stderr))
    step = AutoencoderTrainStep(recon, loss_fn, opt_g, opt_d, last_layer=vae.decoder.conv_out,
                                grad_clip=config.grad_clip, autocast_dtype=autocast_dtype,
                                accelerator=acc, guard=guard, compile=compile,
                                compile_mode=compile_mode, ldm_reference=ldm_reference)
    speed = {"mixed_precision": acc.mixed_precision if acc is not None else str(autocast_dtype),
             "channels_last": channels_last, "fused_adam": bool(opt_g.defaults.get("fused")),
             "data_workers": config.num_workers, "compiled": step.compiled,
             "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
    return AutoencoderParts(vae, recon, disc, perceptual, opt_g, opt_d, guard, step, speed)


class AutoencoderLoop:
    """What ``Run.loop`` calls for the autoencoder: the step on each batch (noting files that
    failed to decode in a data worker), the log values, and the checkpoint."""

    def __init__(self, run, parts: AutoencoderParts, train_set: FlipEncoded, report: ScanReport):
        self.run, self.parts, self.train_set, self.report = run, parts, train_set, report
        self.models = {"vae": parts.recon, "discriminator": parts.disc}
        self.optimizers = {"vae": parts.opt_g, "discriminator": parts.opt_d}

    def note_load_failures(self, extra: dict | None = None) -> None:
        """Files that failed to decode while training: into skipped_files.json."""
        from ..data.images import load_failures

        if self.run.main and self.report.add_load_failures({**load_failures(), **(extra or {})}):
            self.report.write(self.run.out / "skipped_files.json")

    def step(self, batch):
        x, requested, used = batch
        run = self.run
        result = self.parts.step(x.to(run.device, non_blocking=True), run.step)
        if (requested != used).any():
            self.note_load_failures(stand_ins(requested, used, self.train_set.plain,
                                              run.config.resolution, self.report))
        return result, x.shape[0] * run.procs

    def log_values(self, result, images_per_s: float) -> dict:
        from .run import device_memory, scalars

        self.note_load_failures()
        return {**scalars(result.logs), "lr": self.parts.opt_g.param_groups[0]["lr"],
                "images_per_s": images_per_s, "images_seen": self.run.images_seen,
                **device_memory(self.run.device)}

    def checkpoint(self) -> Path:
        return self.run.save_checkpoint({"nonfinite": self.parts.guard.state_dict()},
                                        models=self.models, optimizers=self.optimizers)


def batch_stream(run, loader, sampler, batches_per_epoch: int):
    """Endless batches from the current step on: the data order is a function of (seed, epoch),
    so a resumed run continues mid-epoch exactly where an uninterrupted one would be."""
    while True:
        epoch, offset = divmod(run.step, batches_per_epoch)
        sampler.set_position(epoch, offset * run.config.batch_size * run.procs)
        yield from loader


def open_pixel_cache(run, train_set: FlipEncoded, report: ScanReport):
    """The decoded-image cache of the training images (``data/pixel_cache.py``) in
    ``OUTPUT/image_cache``: built or completed by the main process, then opened by every one;
    files that failed to decode while it was built go to ``skipped_files.json``."""
    from ..data.pixel_cache import PixelCache, build_pixel_cache

    plain, cache_dir = train_set.plain, run.out / "image_cache"
    if run.main:
        build_pixel_cache(plain.items, cache_dir, plain.size, plain.image_key,
                          progress=not run.args.no_progress)
    run.accelerator.wait_for_everyone()
    cache = PixelCache(cache_dir, plain.items, plain.size)
    if run.main and report.add_load_failures(cache.load_failures):
        report.write(run.out / "skipped_files.json")
    return cache


def cached_stream(run, cache, sampler, batches_per_epoch: int):
    """``batch_stream``'s batches, gathered from the decoded-image cache: the same order and
    mirrors (``sampler.order``), each process taking every ``procs``-th batch of the global
    order as accelerate's sharded loader does, on the device already."""
    size, procs, rank = run.config.batch_size, run.procs, run.accelerator.process_index
    while True:
        epoch, offset = divmod(run.step, batches_per_epoch)
        order = sampler.order(epoch)
        for k in range(offset, batches_per_epoch):
            first = (k * procs + rank) * size
            indices = order[first:first + size]
            rows = indices % len(cache)
            yield cache.batch(indices, run.device), rows, rows


def export(run, vae, train_items, image_key, small_images: str) -> tuple[Path, float, int]:
    """Measure the latent scale (1 / std of sampled training latents) and export in diffusers
    format, with the data split that stage 2 must repeat. Main process only."""
    from ..evaluation.autoencoder import batched
    from ..models.vae import measure_scaling_factor
    from .export import export_vae

    config = run.config
    vae = vae.eval()
    n = min(config.scale_images, len(train_items))
    plain = ImageDataset(train_items, config.resolution, flip="none", image_key=image_key)
    generator = torch.Generator().manual_seed(config.seed)
    scale = measure_scaling_factor(vae, batched(plain, 32, run.device, limit=n), generator)
    # small_images is part of the split: it decides which files exist
    split = {"holdout": config.holdout, "split_seed": config.seed,
             "resolution": config.resolution, "data": run.args.data,
             "small_images": small_images}
    return export_vae(vae, run.out / "vae", scale, split), scale, n


class Evaluator:
    """Held-out PSNR/SSIM/LPIPS at every evaluation, and rFID at the final one (or at each with
    ``every_eval``), written to ``metrics.json``, TensorBoard and reconstruction grids.

    rFID runs on the main process alone (the others go on to the next collective and wait
    there); Inception is loaded on first use. A missing or failing Inception is said once and
    recorded as ``"rfid": null`` with the reason: an evaluation metric never ends training.
    """

    def __init__(self, run, parts: AutoencoderParts, held_set, *, rfid: bool,
                 every_eval: bool, inception: str | None):
        from ..io import read_json_or

        self.run, self.parts, self.held_set = run, parts, held_set
        self.rfid_wanted, self.every_eval, self.inception = rfid, every_eval, inception
        self.reason: str | None = None  # why rFID is unavailable
        self.said: str | None = None
        self.originals = None  # the held-out images' Inception features, extracted once
        self.path = run.out / "metrics.json"
        history = read_json_or(self.path, []) if run.step else []
        self.history = [h for h in history if h["step"] <= run.step]  # past the checkpoint
        if run.main and rfid:
            from ..evaluation import features
            from ..evaluation.errors import EvaluationError

            try:  # said before training, not after it
                features.find_inception(inception)
            except EvaluationError as exc:
                self.unavailable(str(exc), " (--no-rfid silences this note)")

    def unavailable(self, reason: str, hint: str = "") -> None:
        from tqdm.auto import tqdm

        self.reason = reason = " ".join(reason.split())  # one line, also in metrics.json
        if self.said != reason:
            self.said = reason
            tqdm.write(f"note: no rFID: {reason}{hint}", file=sys.stderr)

    def _accumulator(self):
        from ..evaluation import features
        from ..evaluation.autoencoder import ReconstructionFID
        from ..evaluation.errors import EvaluationError

        if self.reason is not None:
            return None
        try:
            extractor = features.get_extractor(self.inception, str(self.run.device))
        except Exception as exc:  # noqa: BLE001 - an evaluation metric never ends training
            self.unavailable(str(exc) if isinstance(exc, EvaluationError)
                             else f"cannot load Inception: {type(exc).__name__}: {exc}")
            return None
        return ReconstructionFID(extractor, features.default_batch_size(self.run.device),
                                 original_features=self.originals, fail_soft=True)

    def due(self, step: int) -> bool:
        return len(self.held_set) > 0 and (step % self.run.config.eval_every == 0
                                           or step >= self.run.config.max_steps)

    def on_step(self, step: int, is_checkpoint: bool = False) -> None:
        if self.due(step):
            self.evaluate()

    def finish(self) -> None:
        """A run resumed at its last step (stopped there) still owes its final evaluation."""
        if len(self.held_set) and (not self.history or self.history[-1]["step"] != self.run.step):
            self.evaluate()

    def evaluate(self) -> dict:
        from tqdm.auto import tqdm

        from ..evaluation.autoencoder import batched, describe_metrics, reconstruction_metrics
        from ..io import write_json_atomic
        from ..visual import log_grid, save_grid

        run, cfg, recon = self.run, self.run.config, self.parts.recon
        rfid_due = run.main and self.rfid_wanted and (self.every_eval or run.step >= cfg.max_steps)
        rfid = self._accumulator() if rfid_due else None

        def reconstruct(x):  # autocast for the autoencoder only: metrics and Inception in fp32
            with run.accelerator.autocast():
                return recon(x, sample_posterior=False)[0]

        recon.eval()
        metrics, (orig, rec) = reconstruction_metrics(
            reconstruct, batched(self.held_set, cfg.batch_size, run.device),
            self.parts.perceptual, cfg.perceptual, rfid=rfid)
        recon.train()
        self._note_rfid(metrics, rfid, rfid_due)
        if run.main:
            self.history.append({"step": run.step, **metrics})
            write_json_atomic(self.path, self.history)
            grid = torch.cat([orig, rec])  # originals (top row) over reconstructions
            save_grid(grid, run.out / "reconstructions" / f"step-{run.step:08d}.png",
                      nrow=orig.shape[0])
            log_grid(run.accelerator, "reconstructions", grid, run.step, nrow=orig.shape[0])
            run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()
                                 if isinstance(v, (int, float))}, step=run.step)
            tqdm.write(f"[step {run.step}] held-out " + describe_metrics(metrics))
        return metrics

    def _note_rfid(self, metrics: dict, rfid, rfid_due: bool) -> None:
        if rfid is not None:
            self.originals = rfid.original_features
            if metrics.get("rfid_unavailable"):
                self.unavailable(metrics["rfid_unavailable"])
                # one line in metrics.json too; a failed pass (out of memory?) may work next time
                metrics["rfid_unavailable"], self.reason = self.reason, None
        elif rfid_due:
            metrics.update(rfid=None, rfid_unavailable=self.reason)
