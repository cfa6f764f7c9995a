"""Stage 2: train the latent UNet as a DDPM with an EMA, then export the pipeline.

    accelerate launch --config_file accelerate_config.yaml training/train_unet.py \
        --preset ffhq128-f4 --data /path/to/ffhq/thumbnails128x128 --vae runs/vae/vae \
        --output-dir runs/unet

First encodes every training image and its mirror into a latent cache (``--latent-cache``,
by default ``OUTPUT/latent_cache``; resumed if interrupted, refused if built by another
autoencoder), then trains from it. Writes the resolved config, TensorBoard logs, preview grids
(EMA weights, DDIM), checkpoints, and ``OUTPUT/pipeline/``: a FaceLDMPipeline (EMA UNet + VAE +
DDIM scheduler) refreshed at every checkpoint. Rerunning the same command resumes.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ffhq_ldm.cli_common import UsageError, run_main, training_parser
from ffhq_ldm.config import UNetConfig, config_from_args, save_run_config
from ffhq_ldm.data.latents import build_latent_cache, load_latent_cache, split_for_vae
from ffhq_ldm.export import export_pipeline
from ffhq_ldm.losses.diffusion import DiffusionLoss, draw_global_batch, slice_for
from ffhq_ldm.models.unet import build_sample_scheduler, build_train_scheduler, build_unet
from ffhq_ldm.models.vae import load_vae
from ffhq_ldm.train_utils import (EMA, Throughput, append_jsonl, load_checkpoint, resolve_resume,
                                  save_checkpoint, scalars, warmup_lambda)
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
    return parser.parse_args(argv)


def make_pipeline(vae, unet, config: UNetConfig) -> FaceLDMPipeline:
    pipe = FaceLDMPipeline(vae=vae, unet=unet, scheduler=build_sample_scheduler(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(UNetConfig, args.preset, args, "unet")
    out = Path(args.output_dir)
    if args.gradient_accumulation < 1:
        raise UsageError("--gradient-accumulation must be >= 1")

    # -- accelerator ---------------------------------------------------------------------------
    accelerator = Accelerator(log_with=None if args.log_with == "none" else args.log_with,
                              project_dir=str(out))
    set_seed(config.seed)
    main_proc, device = accelerator.is_main_process, accelerator.device
    accum, procs = args.gradient_accumulation, accelerator.num_processes
    global_batch = config.batch_size * procs * accum

    # -- autoencoder and data split (the VAE's export says how the data was split) ------------
    vae = load_vae(args.vae).eval().requires_grad_(False)
    train_items, _, image_key, resolution = split_for_vae(args.vae, vae, args.data)

    # -- latent cache: built once by the main process, then held on the device ----------------
    cache_dir = Path(args.latent_cache) if args.latent_cache else out / "latent_cache"
    if main_proc:
        build_latent_cache(vae, train_items, cache_dir, resolution, image_key=image_key,
                           batch_size=args.cache_batch_size, device=device,
                           progress=not args.no_progress)
    accelerator.wait_for_everyone()
    cache = load_latent_cache(cache_dir, vae, train_items, resolution).to(device)
    latent_shape = tuple(cache.mean.shape[1:])

    # -- model, loss, optimiser, EMA -----------------------------------------------------------
    unet = build_unet(config, latent_shape[0], latent_shape[1])
    train_sched = build_train_scheduler(config)
    loss_fn = DiffusionLoss(train_sched.alphas_cumprod, config.prediction_type,
                            config.snr_gamma).to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay)
    # Stepped once per optimizer step by us (not by accelerate, which would step it once per
    # process): the schedule's length is the same for any process layout.
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(config.warmup_steps))
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_sched)
    ema = EMA(accelerator.unwrap_model(unet), config.ema_decay)
    ema_unet = copy.deepcopy(accelerator.unwrap_model(unet)).eval().requires_grad_(False)
    vae.to(device)

    # -- resume --------------------------------------------------------------------------------
    step, images_seen = 0, 0
    resume_from = resolve_resume(out, args.resume)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, ema)
        step, images_seen = state["step"], state["images_seen"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if main_proc:
        save_run_config(out / "config.json", unet=config, run={
            "preset": args.preset, "data": args.data, "vae": args.vae, "output_dir": str(out),
            "latent_cache": str(cache_dir), "num_processes": procs, "gradient_accumulation": accum,
            "global_batch": global_batch, "mixed_precision": accelerator.mixed_precision,
            "latent_shape": list(latent_shape), "scaling_factor": cache.scaling_factor})
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

    # -- training loop -------------------------------------------------------------------------
    bar = tqdm(total=config.max_steps, initial=step, desc="train unet", unit="step",
               disable=args.no_progress or not main_proc, dynamic_ncols=True)
    meter = Throughput()
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    unet.train()
    while step < config.max_steps:
        batch = draw_global_batch(config.seed, step, global_batch, len(cache), latent_shape,
                                  config.num_train_timesteps, device)
        for round_ in range(accum):
            part = slice_for(batch, config.batch_size, round_, accelerator.process_index, procs)
            z = cache.sample(part["indices"], noise=part["latent_noise"])
            sync = round_ == accum - 1
            context = accelerator.no_sync(unet) if not sync else contextlib.nullcontext()
            with context, accelerator.autocast():
                loss, logs = loss_fn(unet, z, part["noise"], part["timesteps"])
            accelerator.backward(loss / accum)
            loss_sum += loss.detach() / accum
        grad_norm = None
        if config.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        ema.update(accelerator.unwrap_model(unet))
        step += 1
        loss_count += 1
        images_seen += global_batch
        meter.add(global_batch)
        bar.update(1)

        if step % args.log_every == 0 or step == config.max_steps:
            # The only host-device sync of the loop: read the mean loss every log_every steps.
            mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_count
            values = {"loss": mean_loss, "lr": lr_sched.get_last_lr()[0],
                      "images_per_s": meter.rate(), "images_seen": images_seen,
                      "ema_decay": ema.current_decay(), **scalars(logs)}
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
            accelerator.log(values, step=step)
            if main_proc:
                append_jsonl(out / "log.jsonl", {"step": step, **values})
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{values['images_per_s']:.0f}",
                            seen=images_seen)
            loss_sum.zero_()
            loss_count = 0
        is_last = step == config.max_steps
        if step % config.checkpoint_every == 0 or is_last:
            save_checkpoint(accelerator, out, step, {"step": step, "images_seen": images_seen},
                            ema)
        if main_proc and (step % config.preview_every == 0 or step % config.checkpoint_every == 0
                          or is_last):
            export(step)
    bar.close()
    if main_proc:
        print(f"done: {step} steps, {images_seen} images seen; pipeline: {out / 'pipeline'}; "
              f"previews: {out / 'previews'}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
