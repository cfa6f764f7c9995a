"""Stage 1: train the autoencoder with L1 + LPIPS + KL (or VQ) + PatchGAN, then export it.

    accelerate launch --config_file accelerate_config.yaml training/train_vae.py \
        --preset ffhq128-f4 --data /path/to/ffhq/thumbnails128x128 --output-dir runs/vae

Writes ``OUTPUT/config.json`` (the resolved config), TensorBoard logs, ``metrics.json``
(held-out PSNR/SSIM/LPIPS over training), reconstruction grids, checkpoints, and at the end
``OUTPUT/vae/``: the autoencoder in diffusers format with its measured scaling factor.
Rerunning the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ffhq_ldm.cli_common import UsageError, run_main, training_parser
from ffhq_ldm.config import VAEConfig, config_from_args, save_run_config
from ffhq_ldm.data.images import ImageDataset, open_dataset
from ffhq_ldm.evaluation.autoencoder import batched, reconstruction_metrics
from ffhq_ldm.export import export_vae
from ffhq_ldm.losses.autoencoder import AutoencoderLoss
from ffhq_ldm.losses.perceptual import build_perceptual
from ffhq_ldm.models.discriminator import PatchDiscriminator
from ffhq_ldm.models.vae import Reconstructor, build_vae, decoder_last_layer, measure_scaling_factor
from ffhq_ldm.train_utils import (EpochSampler, Throughput, append_jsonl, load_checkpoint,
                                  resolve_resume, save_checkpoint, scalars)
from ffhq_ldm.visual import save_grid


def parse_args(argv=None):
    parser = training_parser(__doc__.split("\n\n")[0], VAEConfig)
    parser.add_argument("--lpips-trunk", default=None, metavar="PATH",
                        help="torchvision ImageNet weights for the LPIPS trunk "
                             "(vgg16-397923af.pth); default: torchvision's cache")
    return parser.parse_args(argv)


class FlipEncoded(torch.utils.data.Dataset):
    """Index ``i + n`` is image ``i`` mirrored: the sampler decides flips, so order is replayable."""

    def __init__(self, items, size, image_key):
        self.plain = ImageDataset(items, size, flip="none", image_key=image_key)

    def __len__(self):
        return len(self.plain)

    def __getitem__(self, index):
        n = len(self.plain)
        x = self.plain[index % n]
        return x.flip(-1) if index >= n else x


def _describe(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("step", "num_images"))


def main(argv=None) -> int:
    args = parse_args(argv)
    config = config_from_args(VAEConfig, args.preset, args, "vae")
    out = Path(args.output_dir)

    # -- accelerator ---------------------------------------------------------------------------
    accelerator = Accelerator(log_with=None if args.log_with == "none" else args.log_with,
                              project_dir=str(out))
    if accelerator.mixed_precision == "fp16":
        raise UsageError("fp16 is refused for the autoencoder: its activations overflow to NaN. "
                         "Use bf16 or no mixed precision (accelerate_config.yaml or "
                         "--mixed_precision bf16)")
    set_seed(config.seed)
    main_proc = accelerator.is_main_process

    # -- data ----------------------------------------------------------------------------------
    train_items, held_items, image_key = open_dataset(args.data, config.resolution,
                                                       config.holdout, config.seed)
    if len(train_items) < config.batch_size * accelerator.num_processes:
        raise UsageError(f"only {len(train_items)} training images for a global batch of "
                         f"{config.batch_size * accelerator.num_processes}; lower --batch-size")
    train_set = FlipEncoded(train_items, config.resolution, image_key)
    held_set = ImageDataset(held_items, config.resolution, flip="none", image_key=image_key)
    sampler = EpochSampler(len(train_set), config.seed, flip=True)
    loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=config.num_workers > 0)
    batches_per_epoch = len(train_set) // (config.batch_size * accelerator.num_processes)

    # -- models, loss, optimisers --------------------------------------------------------------
    perceptual = build_perceptual(config.perceptual, args.lpips_trunk)  # fails early if offline
    vae = build_vae(config)
    recon_model = Reconstructor(vae)
    disc = PatchDiscriminator(3, config.disc_channels, config.disc_layers)
    loss_fn = AutoencoderLoss(config, perceptual, disc)
    opt_g = torch.optim.Adam(vae.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=config.learning_rate, betas=(0.5, 0.9))
    recon_model, disc, opt_g, opt_d, loader = accelerator.prepare(recon_model, disc, opt_g, opt_d,
                                                                  loader)
    loss_fn.discriminator = disc
    if perceptual is not None:
        perceptual.to(accelerator.device)
    last_layer = decoder_last_layer(vae)

    # -- resume --------------------------------------------------------------------------------
    step, images_seen = 0, 0
    resume_from = resolve_resume(out, args.resume)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from)
        step, images_seen = state["step"], state["images_seen"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if main_proc:
        save_run_config(out / "config.json", vae=config, run={
            "preset": args.preset, "data": args.data, "output_dir": str(out),
            "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision})
    if accelerator.log_with:
        accelerator.init_trackers("train_vae")
    metrics_path = out / "metrics.json"
    history = json.loads(metrics_path.read_text()) if metrics_path.is_file() and step else []

    def run_eval():
        recon_model.eval()
        with accelerator.autocast():
            metrics, (orig, rec) = reconstruction_metrics(
                lambda x: recon_model(x, sample_posterior=False)[0],
                batched(held_set, config.batch_size, accelerator.device),
                perceptual, config.perceptual)
        recon_model.train()
        if main_proc:
            history.append({"step": step, **metrics})
            metrics_path.write_text(json.dumps(history, indent=2) + "\n")
            save_grid(torch.cat([orig, rec]), out / "reconstructions" / f"step-{step:08d}.png",
                      nrow=orig.shape[0])
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            tqdm.write(f"[step {step}] held-out " + _describe(metrics))
        return metrics

    if step == 0 and len(held_set):
        run_eval()

    # -- training loop -------------------------------------------------------------------------
    bar = tqdm(total=config.max_steps, initial=step, desc="train vae", unit="step",
               disable=args.no_progress or not main_proc, dynamic_ncols=True)
    meter = Throughput()
    recon_model.train()
    while step < config.max_steps:
        epoch, offset = divmod(step, batches_per_epoch)
        sampler.set_position(epoch, offset * config.batch_size * accelerator.num_processes)
        for x in loader:
            # generator (autoencoder) update
            with accelerator.autocast():
                x_hat, mean, logvar, vq_loss = recon_model(x)
                loss, logs = loss_fn.generator_loss(
                    x, x_hat, step, last_layer,
                    posterior=None if mean is None else (mean, logvar), vq_loss=vq_loss)
            accelerator.backward(loss)
            if config.grad_clip > 0:
                accelerator.clip_grad_norm_(vae.parameters(), config.grad_clip)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)

            # discriminator update (only from disc_start on)
            if loss_fn.disc_active(step):
                with accelerator.autocast():
                    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step)
                accelerator.backward(d_loss)
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                logs.update(d_logs)

            step += 1
            images_seen += x.shape[0] * accelerator.num_processes
            meter.add(x.shape[0] * accelerator.num_processes)
            bar.update(1)

            # logging, evaluation, checkpoints
            if step % 10 == 0 or step == config.max_steps:
                values = scalars(logs)
                values.update({"lr": opt_g.param_groups[0]["lr"], "images_per_s": meter.rate(),
                               "images_seen": images_seen})
                accelerator.log(values, step=step)
                if main_proc:
                    append_jsonl(out / "log.jsonl", {"step": step, **values})
                bar.set_postfix(loss=f"{values['loss/total']:.4g}",
                                l1=f"{values['loss/l1']:.3f}",
                                img_s=f"{values['images_per_s']:.1f}")
            if len(held_set) and (step % config.eval_every == 0 or step == config.max_steps):
                run_eval()
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save_checkpoint(accelerator, out, step, {"step": step, "images_seen": images_seen})
            if step >= config.max_steps:
                break
    bar.close()

    # -- export: measure the latent scale on training images, save in diffusers format --------
    if main_proc:
        unwrapped = accelerator.unwrap_model(recon_model).vae.eval()
        n = min(config.scale_images, len(train_items))
        plain = ImageDataset(train_items, config.resolution, flip="none", image_key=image_key)
        batches = batched(plain, 32, accelerator.device, limit=n)
        generator = torch.Generator().manual_seed(config.seed)
        scale = measure_scaling_factor(unwrapped, batches, generator)
        split = {"holdout": config.holdout, "split_seed": config.seed,
                 "resolution": config.resolution, "data": args.data}
        export_vae(unwrapped, out / "vae", scale, split)
        final = history[-1] if history else {}
        print(f"exported {out / 'vae'} (scaling_factor {scale:.5f}, measured on {n} images); "
              f"held-out: " + _describe(final))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
