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

import sys
import time
from pathlib import Path

from ffhq_ldm.cli_common import UsageError, run_main
from ffhq_ldm.config import UNetConfig, config_from_args
from ffhq_ldm.train import posthoc_ema
from ffhq_ldm.train.options import training_parser

# Config fields that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("max_steps", "checkpoint_every", "preview_every", "preview_steps", "preview_images")


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
                        help="do not torch.compile the UNet's training forward (compiled by "
                             "default on CUDA only; FFHQ_LDM_COMPILE=0/1 also decides)")
    parser.add_argument("--max-nonfinite", type=int, default=20, metavar="K",
                        help="stop (exit code 2) after K steps in a row with a non-finite loss; "
                             "each one skips its update")
    posthoc_ema.add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("gradient_accumulation", "max_nonfinite", "log_every", "cache_batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = config_from_args(UNetConfig, args.preset, args, "unet")

    import torch

    from ffhq_ldm.data.images import open_dataset_checked
    from ffhq_ldm.data.latents import load_latent_cache
    from ffhq_ldm.data.split import read_split
    from ffhq_ldm.models.vae import LatentCodec, load_vae
    from ffhq_ldm.train import stage2
    from ffhq_ldm.train.run import Run, device_memory, scalars

    run = Run("unet", args, config, MAY_CHANGE)
    accum = args.gradient_accumulation
    global_batch = config.batch_size * run.procs * accum

    # -- autoencoder and data: split as the autoencoder's training split it ------------------
    vae = load_vae(args.vae).eval().requires_grad_(False)
    codec = LatentCodec(vae)  # what the latent cache needs of it
    split = read_split(args.vae, vae.config.sample_size)
    resolution = split["resolution"]
    train_items, _, image_key, report = open_dataset_checked(
        args.data, resolution, split["holdout"], split["split_seed"],
        split.get("small_images", "upscale"), progress=run.main and not args.no_progress)
    run.write_scan_report(report)

    # -- latent cache: built once by the main process, then held on the device ----------------
    cache_dir = Path(args.latent_cache) if args.latent_cache else run.out / "latent_cache"
    if run.main:
        stage2.build_cache(run, codec, train_items, cache_dir, resolution, image_key, report,
                               args.cache_batch_size)
    run.accelerator.wait_for_everyone()
    cache = load_latent_cache(cache_dir, codec, train_items, resolution).to(run.device)
    latent_shape = tuple(cache.mean.shape[1:])

    # -- model, loss, optimiser, EMA: the step the bench times too ----------------------------
    parts = stage2.build(run, config, latent_shape, compile=False if args.no_compile else None,
                             max_nonfinite=args.max_nonfinite)
    vae.to(run.device)
    posthoc = posthoc_ema.from_args(args, parts.step.ema_model)  # None without --posthoc-ema
    run_facts = {"num_train_images": len(train_items), "global_batch": global_batch,
                 "latent_shape": list(latent_shape),
                 "vae_fingerprint": stage2.cache_fingerprint(cache_dir)}
    run.print("speed: " + ", ".join(f"{k}={v}" for k, v in parts.speed.items()))

    # -- resume, config ------------------------------------------------------------------------
    # Mean loss between log lines: summed on the device, finite steps only.
    window = torch.zeros(2, device=run.device)  # (loss sum, count)
    state = run.resume(run_facts, models={"unet": parts.unet}, optimizers={"unet": parts.opt},
                       schedulers={"lr": parts.lr_sched}, ema=parts.ema, guard=parts.guard)
    if state is not None:
        window[0], window[1] = state["log_window"]["loss_sum"], state["log_window"]["count"]
        if posthoc is not None:
            posthoc.load(run.resumed_from)
    if posthoc is not None and run.main:
        posthoc.prune(run.out, run.step)
    run.save_config(vae=args.vae, latent_cache=str(cache_dir), gradient_accumulation=accum,
                    global_batch=global_batch, latent_shape=list(latent_shape),
                    scaling_factor=cache.scaling_factor, max_nonfinite=args.max_nonfinite,
                    speed=parts.speed, posthoc_ema=posthoc and posthoc.settings())
    exporter = stage2.Exporter(run, vae, parts, config, latent_shape, global_batch)

    # -- training loop -------------------------------------------------------------------------
    def step_fn(batch):
        # forward, backward, clipping, AdamW, LR schedule and EMA, all queued on the device;
        # a non-finite loss or gradient skips the optimizer step and the EMA update
        slices = stage2.micro_batches(batch, config.batch_size, run, accum)
        result = parts.step(cache, slices)
        if posthoc is not None:
            posthoc.update(parts.step.ema_model,
                           enabled=True if result.skipped is None else ~result.skipped)
        window[0] += torch.where(result.skipped, 0.0, result.loss)
        window[1] += (~result.skipped).float()
        return result, global_batch

    def log_values(result, images_per_s):
        # the only host-device sync of the loop: the mean loss every log_every steps
        total, count = run.accelerator.reduce(window[0], "mean").item(), window[1].item()
        window.zero_()
        values = {"loss": total / count if count else float("nan"),
                  "lr": parts.lr_sched.get_last_lr()[0], "images_per_s": images_per_s,
                  "images_seen": run.images_seen, "ema_decay": parts.ema.current_decay(),
                  **scalars(result.logs), **device_memory(run.device)}
        if result.grad_norm is not None:
            values["grad_norm"] = float(result.grad_norm)
        return values

    def checkpoint():
        # the log window is averaged over processes, so every rank resumes with the same one
        mean = run.accelerator.reduce(window[0].clone(), "mean")
        return run.save_checkpoint(
            {"nonfinite": parts.guard.state_dict(),
             "log_window": {"loss_sum": mean.item(), "count": window[1].item()}},
            models={"unet": parts.unet}, optimizers={"unet": parts.opt},
            schedulers={"lr": parts.lr_sched}, ema=parts.ema,
            extras=[posthoc] if posthoc else [])

    def on_step(step, is_checkpoint):
        exporter.on_step(step, is_checkpoint)
        if posthoc is not None and run.main:
            posthoc.maybe_snapshot(step, run.out, final=step == config.max_steps)

    batches = stage2.batch_stream(run, config, global_batch, len(cache), latent_shape)
    parts.unet.train()
    code = run.loop(batches, step_fn, parts.guard, checkpoint, desc="train unet",
                    log_every=args.log_every, log_values=log_values, on_step=on_step)
    if code is not None:
        return code
    exporter.finish()  # resumed at the end (stopped at its last step): export once more
    if run.main:
        minutes = (time.perf_counter() - started) / 60
        print(f"done: {run.step} steps, {run.images_seen} images seen, {minutes:.1f} min in this "
              f"run; pipeline: {run.out / 'pipeline'}; previews: {run.out / 'previews'}")
        if parts.guard.total:
            print(f"{parts.guard.total} update(s) were skipped for a non-finite loss "
                  "(see log.jsonl)")
    run.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
