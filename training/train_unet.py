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

from ffhq_ldm.cli_common import run_trainer
from ffhq_ldm.config import UNetConfig, config_from_args
from ffhq_ldm.train.options import (
    add_posthoc_arguments,
    require_data,
    require_positive,
    require_vae,
    training_parser,
)

# Config fields that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("max_steps", "checkpoint_every", "preview_every", "preview_steps", "preview_images")


def parse_args(argv=None):
    parser = training_parser(__doc__.split("\n\n")[0], UNetConfig)
    parser.add_argument("--vae", required=True, help="the exported autoencoder folder (OUT/vae)")
    parser.add_argument("--latent-cache", default=None,
                        help="latent cache folder (default: OUTPUT/latent_cache)")
    parser.add_argument("--cache-batch-size", type=int, default=None,
                        help="images encoded at once when building the cache (default: 256 on "
                             "CUDA, 64 elsewhere)")
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
    add_posthoc_arguments(parser)
    args = parser.parse_args(argv)
    require_positive(args, "gradient_accumulation", "max_nonfinite", "log_every",
                     "cache_batch_size")
    return args


def open_latents(run, args):
    """The autoencoder, the training images (split as its training split them) and their latent
    cache: built once by the main process, then held on the device."""
    from ffhq_ldm.data.images import open_dataset_checked
    from ffhq_ldm.data.latents import load_latent_cache
    from ffhq_ldm.data.split import read_split
    from ffhq_ldm.models.vae import LatentCodec, load_vae
    from ffhq_ldm.train import stage2

    vae = load_vae(args.vae).eval().requires_grad_(False)
    codec = LatentCodec(vae)  # what the latent cache needs of it
    split = read_split(args.vae, vae.config.sample_size)
    resolution = split["resolution"]
    train_items, _, image_key, report = open_dataset_checked(
        args.data, resolution, split["holdout"], split["split_seed"],
        split.get("small_images", "upscale"), progress=run.main and not args.no_progress)
    run.write_scan_report(report)
    cache_dir = Path(args.latent_cache) if args.latent_cache else run.out / "latent_cache"
    if run.main:
        stage2.build_cache(run, codec, train_items, cache_dir, resolution, image_key, report,
                           args.cache_batch_size)
    run.accelerator.wait_for_everyone()
    cache = load_latent_cache(cache_dir, codec, train_items, resolution).to(run.device)
    return vae, train_items, cache_dir, cache


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = config_from_args(UNetConfig, args.preset, args, "unet")
    require_data(args.data)  # options first, then paths: all before anything heavy loads
    require_vae(args.vae)

    from ffhq_ldm.data.images import items_digest
    from ffhq_ldm.train import posthoc_ema, stage2
    from ffhq_ldm.train.run import Run

    run = Run("unet", args, config, MAY_CHANGE)
    accum = args.gradient_accumulation
    global_batch = config.batch_size * run.procs * accum

    # -- autoencoder, data and their latent cache ---------------------------------------------
    vae, train_items, cache_dir, cache = open_latents(run, args)
    latent_shape = tuple(cache.mean.shape[1:])

    # -- model, loss, optimiser, EMA: the step the bench times too ----------------------------
    parts = stage2.build(run, config, latent_shape, compile=False if args.no_compile else None,
                         max_nonfinite=args.max_nonfinite)
    vae.to(run.device)
    run.print("speed: " + ", ".join(f"{k}={v}" for k, v in parts.speed.items()))
    posthoc = posthoc_ema.from_args(args, parts.step.ema_model)  # None without --posthoc-ema
    loop = stage2.UNetLoop(run, parts, cache, config.batch_size, accum, global_batch, posthoc)

    # -- resume, config ------------------------------------------------------------------------
    run_facts = {"num_train_images": len(train_items),
                 "data_fingerprint": items_digest(train_items), "global_batch": global_batch,
                 "latent_shape": list(latent_shape),
                 "vae_fingerprint": stage2.cache_fingerprint(cache_dir)}
    loop.load_state(run.resume(run_facts, models={"unet": parts.unet},
                               optimizers={"unet": parts.opt}, schedulers={"lr": parts.lr_sched},
                               ema=parts.ema, guard=parts.guard))
    run.save_config(vae=args.vae, latent_cache=str(cache_dir), gradient_accumulation=accum,
                    global_batch=global_batch, latent_shape=list(latent_shape),
                    scaling_factor=cache.scaling_factor, max_nonfinite=args.max_nonfinite,
                    speed=parts.speed, posthoc_ema=posthoc and posthoc.settings())
    exporter = stage2.Exporter(run, vae, parts, config, latent_shape, global_batch)

    # -- training loop, then the last export ---------------------------------------------------
    batches = stage2.batch_stream(run, config, global_batch, len(cache), latent_shape)
    parts.unet.train()
    code = run.loop(batches, loop.step, parts.guard, loop.checkpoint, desc="train unet",
                    log_every=args.log_every, log_values=loop.log_values,
                    on_step=lambda step, is_ckpt: (exporter.on_step(step, is_ckpt),
                                                   loop.snapshot(step)))
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
    sys.exit(run_trainer(main))
