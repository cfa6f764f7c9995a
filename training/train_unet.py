"""Stage 2: train the latent UNet as a DDPM with an EMA, then export the pipeline.

    accelerate launch --config_file accelerate_config.yaml training/train_unet.py \
        --preset ffhq128-f4 --data /path/to/ffhq/thumbnails128x128 --vae runs/vae/vae \
        --output-dir runs/unet

First encodes every training image and its mirror into a latent cache (``--latent-cache``,
by default ``OUTPUT/latent_cache``; resumed if interrupted, refused if built by another
autoencoder), then trains from it. Writes the resolved config, TensorBoard logs, preview grids
(EMA weights, DDIM), checkpoints, and ``OUTPUT/pipeline/``: a FaceLDMPipeline (EMA UNet + VAE +
DDIM scheduler) refreshed at every checkpoint.

Nothing lost, nothing crashes (as in train_vae.py):
- Rerunning the same command resumes exactly (bit for bit on CPU: weights, EMA, AdamW, LR
  schedule, counters, RNG) from the latest complete checkpoint, or from ``--resume PATH``;
  other settings than the checkpoint's are refused in one line.
- SIGTERM or SIGINT (Ctrl-C): a checkpoint at the end of the current step, then exit code 75
  (``EXIT_PREEMPTED``); a second signal stops at once.
- A non-finite loss or gradient norm skips that step's AdamW and EMA updates without a
  host-device sync (fused AdamW's ``found_inf``); ``--max-nonfinite`` in a row stop the run
  with exit code 2 (noticed at the next log line), keeping the last good checkpoint.
- Unusable image files are left out and listed in ``OUTPUT/skipped_files.json``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ffhq_ldm.checkpoints import (check_resumable, checkpoint_lineage, clean_stale,
                                  list_checkpoints, load_checkpoint, read_trainer_state,
                                  resolve_resume, save_checkpoint)
from ffhq_ldm.cli_common import UsageError, run_main, training_parser
from ffhq_ldm.config import UNetConfig, config_from_args, save_run_config, to_dict
from ffhq_ldm.data.images import load_failures, open_dataset_checked
from ffhq_ldm.data.latents import build_latent_cache, load_latent_cache
from ffhq_ldm.export import export_pipeline, read_split
from ffhq_ldm.fast import (FastTrainStep, channels_last_wanted, enable_cudnn_autotune,
                           enable_tf32, maybe_compile, to_channels_last)
from ffhq_ldm.losses.diffusion import DiffusionLoss, draw_global_batch, slice_for
from ffhq_ldm.models.unet import build_sample_scheduler, build_train_scheduler, build_unet
from ffhq_ldm.models.vae import load_vae
from ffhq_ldm.runtime import training_mixed_precision
from ffhq_ldm.train_utils import (EMA, GracefulStop, NonFiniteGuard, Throughput, append_jsonl,
                                  check_process_group, device_memory, exit_nonfinite,
                                  exit_preempted, finite_or_none, fused_supported, scalars,
                                  seed_step, truncate_jsonl, warmup_lambda)
from ffhq_ldm.visual import save_grid
from pipelines.pipeline_face_ldm import FaceLDMPipeline


def parse_args(argv=None):
    parser = training_parser(__doc__.split("\n\n")[0], UNetConfig)
    parser.add_argument("--vae", required=True, help="the exported autoencoder folder (OUT/vae)")
    parser.add_argument("--latent-cache", default=None,
                        help="latent cache folder (default: OUTPUT/latent_cache)")
    parser.add_argument("--cache-batch-size", type=int, default=64,
                        help="images encoded at once when building the cache")
    parser.add_argument("--gradient-accumulation", type=int, default=1,
                        help="micro-batches per optimizer step; global batch = batch-size x "
                             "processes x this")
    parser.add_argument("--log-every", type=int, default=25, help="steps between log lines")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not torch.compile the UNet's training forward (compiled by default "
                             "on CUDA only; FFHQ_LDM_COMPILE=0/1 also decides)")
    parser.add_argument("--max-nonfinite", type=int, default=20, metavar="K",
                        help="stop (exit code 2) after K steps in a row with a non-finite loss; "
                             "each one skips its update")
    return parser.parse_args(argv)


# Config fields that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("max_steps", "checkpoint_every", "preview_every", "preview_steps", "preview_images")


def make_pipeline(vae, unet, config: UNetConfig) -> FaceLDMPipeline:
    pipe = FaceLDMPipeline(vae=vae, unet=unet, scheduler=build_sample_scheduler(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = config_from_args(UNetConfig, args.preset, args, "unet")
    out = Path(args.output_dir)
    if args.gradient_accumulation < 1:
        raise UsageError("--gradient-accumulation must be >= 1")
    if args.max_nonfinite < 1 or args.log_every < 1:
        raise UsageError("--max-nonfinite and --log-every must be >= 1")

    # -- accelerator ---------------------------------------------------------------------------
    accelerator = Accelerator(log_with=None if args.log_with == "none" else args.log_with,
                              project_dir=str(out), mixed_precision=training_mixed_precision())
    check_process_group(accelerator)
    set_seed(config.seed)
    enable_tf32()  # what bf16 autocast leaves in fp32 runs on tensor cores too
    enable_cudnn_autotune()  # one batch shape for the whole run: pick conv kernels once
    main_proc, device = accelerator.is_main_process, accelerator.device
    accum, procs = args.gradient_accumulation, accelerator.num_processes
    global_batch = config.batch_size * procs * accum

    # -- autoencoder and data split (the VAE's export says how the data was split) ------------
    vae = load_vae(args.vae).eval().requires_grad_(False)
    # As latents.split_for_vae, plus the small-image policy: it decides which files exist.
    split = read_split(args.vae) or {"holdout": 0, "split_seed": 0,
                                     "resolution": vae.config.sample_size}
    resolution = split["resolution"]
    train_items, _, image_key, report = open_dataset_checked(
        args.data, resolution, split["holdout"], split["split_seed"],
        split.get("small_images", "upscale"), progress=main_proc and not args.no_progress)
    report_path = out / "skipped_files.json"
    if report is not None and main_proc:
        report.write(report_path)
        accelerator.print(f"data: {report.summary()}" + (f"; see {report_path}" if
                                                         report.exit_code() else ""))

    # -- latent cache: built once by the main process, then held on the device ----------------
    cache_dir = Path(args.latent_cache) if args.latent_cache else out / "latent_cache"
    if main_proc:
        build_latent_cache(vae, train_items, cache_dir, resolution, image_key=image_key,
                           batch_size=args.cache_batch_size, device=device,
                           progress=not args.no_progress)
        failures = load_failures()  # images that failed to decode while encoding
        if failures and report is not None and report.add_load_failures(failures):
            report.write(report_path)
            accelerator.print(f"data: {report.summary()}; see {report_path}")
    accelerator.wait_for_everyone()
    cache = load_latent_cache(cache_dir, vae, train_items, resolution).to(device)
    latent_shape = tuple(cache.mean.shape[1:])

    # -- model, loss, optimiser, EMA -----------------------------------------------------------
    # Seeded here, not only at the start: building the cache draws from the global RNG (a data
    # loader's base seed), and the initial weights must not depend on whether it was built.
    set_seed(config.seed)
    # NHWC weights on CUDA, the layout tensor-core convolutions run in (state_dict unchanged)
    channels_last = channels_last_wanted(device)
    unet = to_channels_last(build_unet(config, latent_shape[0], latent_shape[1]), channels_last)
    train_sched = build_train_scheduler(config)
    loss_fn = DiffusionLoss(train_sched.alphas_cumprod, config.prediction_type,
                            config.snr_gamma).to(device)
    # Fused AdamW where torch has it: faster, and it skips a step on a device-side flag.
    fused = fused_supported(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay, fused=fused)
    # Stepped once per optimizer step by us (not by accelerate, which would step it once per
    # process): the schedule's length is the same for any process layout.
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema = EMA(accelerator.unwrap_model(unet), config.ema_decay)
    ema_unet = copy.deepcopy(accelerator.unwrap_model(unet)).eval().requires_grad_(False)
    vae.to(device)
    guard = NonFiniteGuard(args.max_nonfinite, device,
                           deferred=fused and accelerator.scaler is None,
                           reduce=(lambda t: accelerator.reduce(t, "sum")) if procs > 1 else None,
                           write=lambda text: tqdm.write(text, file=sys.stderr))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    run_facts = {"num_train_images": len(train_items), "global_batch": global_batch,
                 "latent_shape": list(latent_shape), "vae_fingerprint": manifest["vae_fingerprint"]}
    # Mean loss between log lines: summed on the device, finite steps only.
    loss_sum = torch.zeros((), device=device)
    loss_count = torch.zeros((), device=device)
    # Only the forward is compiled: `unet` stays what accelerate saves and clips, and its
    # unwrapped module is what the EMA follows. Not twice if accelerate's config compiled it.
    compiled = hasattr(unet, "_orig_mod")
    forward = unet
    if not compiled:
        forward = maybe_compile(unet, enabled=False if args.no_compile else None)
        compiled = forward is not unet
    train_step = FastTrainStep(unet, loss_fn, optimizer, ema=ema,
                               ema_model=accelerator.unwrap_model(unet), forward=forward,
                               lr_scheduler=lr_sched, grad_clip=config.grad_clip,
                               accelerator=accelerator, guard=guard)
    speed = {"mixed_precision": accelerator.mixed_precision, "channels_last": channels_last,
             "fused_adamw": fused, "compiled": compiled,
             "tf32": device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32}
    accelerator.print("speed: " + ", ".join(f"{k}={v}" for k, v in speed.items()))

    # -- resume --------------------------------------------------------------------------------
    if main_proc:
        clean_stale(out)  # the hidden leftovers of a crash in the middle of a save
    step, images_seen = 0, 0
    resume_from = resolve_resume(out, args.resume)
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        check_resumable(state, resume_from, "unet", UNetConfig, config, run_facts, MAY_CHANGE)
        load_checkpoint(accelerator, resume_from, models={"unet": unet},
                        optimizers={"unet": optimizer}, schedulers={"lr": lr_sched}, ema=ema,
                        state=state)
        step, images_seen = state["step"], state["images_seen"]
        guard.load_state_dict(state.get("nonfinite", {}), step)
        loss_sum.fill_(state["log_window"]["loss_sum"])
        loss_count.fill_(state["log_window"]["count"])
        if main_proc:
            truncate_jsonl(out / "log.jsonl", step)
        accelerator.print(f"resumed from {resume_from} at step {step}")
    lineage = checkpoint_lineage(out, resume_from, step)
    if len(lineage) < len(list_checkpoints(out)):
        accelerator.print(f"note: the other checkpoints in {out / 'checkpoints'} are not this "
                          "run's; its first save replaces them")
    if main_proc:
        save_run_config(out / "config.json", unet=config, run={
            "preset": args.preset, "data": args.data, "vae": args.vae, "output_dir": str(out),
            "latent_cache": str(cache_dir), "num_processes": procs, "gradient_accumulation": accum,
            "global_batch": global_batch, "mixed_precision": accelerator.mixed_precision,
            "latent_shape": list(latent_shape), "scaling_factor": cache.scaling_factor,
            "max_nonfinite": args.max_nonfinite, "speed": speed})
    if accelerator.log_with:
        accelerator.init_trackers("train_unet")

    def export(tag_step: int):
        """Preview grid and pipeline export with the EMA weights (main process only)."""
        ema.copy_to(ema_unet)
        pipe = make_pipeline(vae, ema_unet, config)
        generator = torch.Generator(device="cpu").manual_seed(1234)
        latents = torch.randn((config.preview_images, *latent_shape), generator=generator)
        images = pipe(batch_size=config.preview_images, num_inference_steps=config.preview_steps,
                      latents=latents, output_type="pt").images
        grid = save_grid(images * 2 - 1, out / "previews" / f"step-{tag_step:08d}.png")
        tracker = accelerator.get_tracker("tensorboard") if accelerator.log_with else None
        if tracker is not None and hasattr(tracker, "writer"):
            tracker.writer.add_images("preview", images, tag_step)
        card = {"data": args.data, "preset": args.preset, "step": tag_step,
                "batch_size": global_batch, "images_seen": images_seen,
                "ema_decay": config.ema_decay}
        export_pipeline(pipe, out / "pipeline", card)
        return grid

    def checkpoint() -> Path:
        # the log window is averaged over processes, so every rank resumes with the same one
        window = accelerator.reduce(loss_sum.clone(), "mean")
        return save_checkpoint(
            accelerator, out, step,
            {"trainer": "unet", "images_seen": images_seen, "config": to_dict(config),
             "run": run_facts, "nonfinite": guard.state_dict(),
             "log_window": {"loss_sum": window.item(), "count": loss_count.item()}},
            models={"unet": unet}, optimizers={"unet": optimizer}, schedulers={"lr": lr_sched},
            ema=ema, lineage=lineage)

    # -- training loop -------------------------------------------------------------------------
    bar = tqdm(total=config.max_steps, initial=step, desc="train unet", unit="step",
               disable=args.no_progress or not main_proc, dynamic_ncols=True)
    meter = Throughput()
    unet.train()
    last_saved = step if resume_from is not None else None
    exported = step if step < config.max_steps else None
    with GracefulStop(accelerator) as stop:
        while step < config.max_steps:
            # everything random about this step from (seed, step): layout-independent batches,
            # and the global RNG (dropout) reseeded per process
            seed_step(config.seed, step, accelerator.process_index)
            batch = draw_global_batch(config.seed, step, global_batch, len(cache), latent_shape,
                                      config.num_train_timesteps, device)
            parts = [slice_for(batch, config.batch_size, r, accelerator.process_index, procs)
                     for r in range(accum)]
            # forward, backward, clipping, AdamW, LR schedule and EMA, all queued on the device;
            # a non-finite loss or gradient skips the optimizer step and the EMA update
            step_loss, logs, grad_norm, bad = train_step(cache, parts)
            loss_sum += torch.where(bad, 0.0, step_loss)
            loss_count += (~bad).float()
            step += 1
            guard.record(bad, step)
            images_seen += global_batch
            meter.add(global_batch)
            bar.update(1)

            # logging, non-finite check, checkpoints, preemption, previews
            is_last = step == config.max_steps
            is_log = step % args.log_every == 0 or is_last
            is_ckpt = step % config.checkpoint_every == 0 or is_last
            if (is_log or is_ckpt or not guard.deferred) and guard.poll(step):
                return exit_nonfinite(accelerator, guard, out, step)
            if is_log:
                # The only host-device sync of the loop: the mean loss every log_every steps.
                total, count = accelerator.reduce(loss_sum, "mean").item(), loss_count.item()
                mean_loss = total / count if count else float("nan")
                values = {"loss": mean_loss, "lr": lr_sched.get_last_lr()[0],
                          "images_per_s": meter.rate(), "images_seen": images_seen,
                          "ema_decay": ema.current_decay(), **scalars(logs),
                          **device_memory(device)}
                if grad_norm is not None:
                    values["grad_norm"] = float(grad_norm)
                accelerator.log(values, step=step)
                if main_proc:
                    record = {k: finite_or_none(v) for k, v in values.items()}
                    append_jsonl(out / "log.jsonl", {"step": step, **record,
                                                     "nonfinite_skipped": guard.total})
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{values['images_per_s']:.0f}",
                                seen=images_seen)
                loss_sum.zero_()
                loss_count.zero_()
            if is_ckpt:
                checkpoint()
                last_saved = step
            if stop.should_stop(step):
                return exit_preempted(accelerator, stop, out, step, last_saved, checkpoint, bar)
            if main_proc and (step % config.preview_every == 0 or is_ckpt):
                export(step)
                exported = step
    bar.close()
    if main_proc and exported != step:  # resumed at the end (stopped at its last step)
        export(step)
    if main_proc:
        minutes = (time.perf_counter() - started) / 60
        print(f"done: {step} steps, {images_seen} images seen, {minutes:.1f} min in this run; "
              f"pipeline: {out / 'pipeline'}; previews: {out / 'previews'}")
        if guard.total:
            print(f"{guard.total} update(s) were skipped for a non-finite loss (see log.jsonl)")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
