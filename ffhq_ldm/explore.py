"""``ffhq-ldm interpolate | invert | inpaint``: walk between faces, bring a photo into the model
and vary it, fill in a masked region. All three run FaceLDMPipeline's own methods
(pipelines/face_ldm_explore.py) with DDIM, so an exported folder does the same without this
package.

    ffhq-ldm interpolate --model M --seeds 3,17 --frames 16 --out DIR
    ffhq-ldm invert      --model M --image FILE [--out DIR --variations K --eta E]
    ffhq-ldm inpaint     --model M --image FILE --mask FILE [--out DIR]

Images of another size than the model's are centre-cropped to a square and resized to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .cli_common import DefaultsHelpFormatter, UsageError

PERCEPTUAL = ("auto", "lpips-vgg", "lpips-alex", "lpips-vgg-random-trunk", "none")


# ---------------------------------------------------------------------------------------------
# shared pieces

def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{name} must be positive, got {value}")


def _load(args):
    from .sampling import load_pipeline, pick_device

    _positive("--steps", args.steps)
    pipe = load_pipeline(args.model, "ddim", "fp32", pick_device(args.device))
    pipe.set_progress_bar_config(disable=args.no_progress, leave=False)
    return pipe


def open_user_image(path: str, what: str = "image"):
    """A user's image file as PIL RGB, or a one-line UsageError for a missing or non-image
    file."""
    from PIL import Image, UnidentifiedImageError

    from .data.images import check_pixels, open_image, to_rgb

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        image = open_image(file)
        check_pixels(image)
        image.load()
        return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise UsageError(f"{what} {path} is not a readable image ({exc})") from None


def fit(image, size: int):
    """Centre square crop, resized to the model's size (as the training data was)."""
    from .data.images import center_crop_resize

    return center_crop_resize(image, size)


def model_size(pipe) -> int:
    height, width = pipe.image_size()
    if height != width:
        raise UsageError(f"the model makes {width}x{height} images; only square ones are handled")
    return height


def _save(images, out: Path, names: list[str]) -> list[Path]:
    paths = []
    for image, name in zip(images, names, strict=True):
        path = out / name
        image.save(path)
        paths.append(path)
    return paths


def strip(images, pad: int = 2):
    """PIL images side by side on white, ``pad`` pixels apart."""
    from PIL import Image

    w, h = images[0].size
    canvas = Image.new("RGB", (len(images) * (w + pad) + pad, h + 2 * pad), "white")
    for i, image in enumerate(images):
        canvas.paste(image.convert("RGB"), (pad + i * (w + pad), pad))
    return canvas


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two [0, 1] tensors: 10 log10(1 / MSE)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def build_lpips(kind: str, trunk: str | None):
    """(module or None, the variant's name). ``auto``: LPIPS-VGG when its ImageNet trunk is on
    disk, else the random-trunk variant, which is not the LPIPS metric and says so."""
    from .losses.perceptual import PerceptualWeightsError, build_perceptual

    if kind != "auto":
        return build_perceptual(kind, trunk), kind
    try:
        return build_perceptual("lpips-vgg", trunk), "lpips-vgg"
    except PerceptualWeightsError:
        print("note: no LPIPS VGG trunk on this machine (see --lpips-trunk); reporting the "
              "random-trunk variant, which is NOT the LPIPS metric", file=sys.stderr)
        return build_perceptual("lpips-vgg-random-trunk"), "lpips-vgg-random-trunk"


def _to_pil(tensor):
    from PIL import Image

    array = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    return Image.fromarray(array.astype("uint8"))


def _to_unit(image):
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# interpolate

def _pair(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise UsageError(f"{what} takes two values separated by a comma, got {text!r}")
    return parts


def _interpolate(args) -> int:
    import torch

    _positive("--batch-size", args.batch_size)
    if args.frames < 2:
        raise UsageError(f"--frames must be at least 2, got {args.frames}")
    if args.seeds is not None:
        pair = _pair(args.seeds, "--seeds")
        try:
            seeds = [int(s) for s in pair]
        except ValueError:
            raise UsageError(f"--seeds takes two integers, got {args.seeds!r}") from None
        pipe = _load(args)
        start, end = pipe.seed_noise(seeds)
        what = f"seeds {seeds[0]} and {seeds[1]}"
    else:
        files = _pair(args.images, "--images")
        raw = [open_user_image(f) for f in files]  # refused before the model loads
        pipe = _load(args)
        size = model_size(pipe)
        images = torch.stack([_to_unit(fit(im, size)) for im in raw])
        print(f"inverting {files[0]} and {files[1]} ({args.steps} DDIM steps)", file=sys.stderr)
        start, end = pipe.invert(images, num_inference_steps=args.steps).noise.cpu()
        what = f"the inverted {files[0]} and {files[1]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sampling {args.frames} frames ({args.steps} DDIM steps, eta 0)", file=sys.stderr)
    frames = pipe.interpolate(start, end, num_frames=args.frames, num_inference_steps=args.steps,
                              batch_size=args.batch_size).images
    _save(frames, out, [f"frame_{k:03d}.png" for k in range(len(frames))])
    strip_path = out / "strip.png"
    strip(frames).save(strip_path)
    gif = out / "interpolation.gif"
    # there and back again, so the loop has no jump
    loop = frames + frames[-2:0:-1]
    loop[0].save(gif, save_all=True, append_images=loop[1:], duration=args.frame_ms, loop=0)
    print(f"{args.frames} frames between {what}: {out}/frame_*.png, strip {strip_path}, "
          f"animation {gif}")
    return 0


# ---------------------------------------------------------------------------------------------
# invert

def _invert(args) -> int:
    import torch

    if args.variations < 0:
        raise UsageError(f"--variations must be >= 0, got {args.variations}")
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    raw = [open_user_image(f) for f in args.image]
    pipe = _load(args)
    perceptual, kind = build_lpips(args.perceptual, args.lpips_trunk)
    size = model_size(pipe)
    device = pipe._execution_device
    if perceptual is not None:
        perceptual.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, (file, image) in enumerate(zip(args.image, raw, strict=True)):
        unique = len({Path(f).stem for f in args.image}) == len(args.image)
        stem = Path(file).stem if unique else f"{index:03d}_{Path(file).stem}"
        original = _to_unit(fit(image, size))[None]
        inv = pipe.invert(original, num_inference_steps=args.steps)
        rec = pipe(latents=inv.noise, num_inference_steps=args.steps, eta=0.0,
                   output_type="pt").images.cpu()
        with torch.no_grad():
            vae_only = (pipe.decode_latents(inv.latents) / 2 + 0.5).clamp(0, 1).cpu()
        gens = [torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + k)
                for k in range(args.variations)]
        variations = []
        if gens:
            noise = inv.noise.expand(len(gens), -1, -1, -1)
            variations = pipe(latents=noise, num_inference_steps=args.steps, eta=args.eta,
                              generator=gens, output_type="pil").images
        row = {"image": file, "psnr": psnr(rec, original), "psnr_autoencoder": psnr(vae_only,
                                                                                   original)}
        if perceptual is not None:
            with torch.no_grad():
                pair = [t.to(device) * 2 - 1 for t in (rec, original, vae_only)]
                row["lpips"] = float(perceptual(pair[0], pair[1]).mean())
                row["lpips_autoencoder"] = float(perceptual(pair[2], pair[1]).mean())
        pictures = [_to_pil(original[0]), _to_pil(rec[0]), *variations]
        names = [f"{stem}_original.png", f"{stem}_reconstruction.png",
                 *[f"{stem}_variation_{k}.png" for k in range(len(variations))]]
        _save(pictures, out, names)
        strip(pictures).save(out / f"{stem}_strip.png")
        from safetensors.torch import save_file

        save_file({"noise": inv.noise.cpu().contiguous()}, out / f"{stem}_noise.safetensors")
        results.append(row)
        lp = f", {kind} {row['lpips']:.4f}" if "lpips" in row else ""
        lp_ae = f", {kind} {row['lpips_autoencoder']:.4f}" if "lpips" in row else ""
        print(f"{file}: inverted and regenerated: PSNR {row['psnr']:.2f} dB{lp}; the "
              f"autoencoder alone: PSNR {row['psnr_autoencoder']:.2f} dB{lp_ae}")
    payload = {"model": str(args.model), "steps": args.steps, "eta": args.eta,
               "variations": args.variations, "seed": args.seed, "perceptual": kind,
               "images": results}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"original, reconstruction and {args.variations} variation(s) per image "
          f"(*_strip.png), inverted noise (*_noise.safetensors), metrics.json: {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# inpaint

def _inpaint(args) -> int:
    import numpy as np
    import torch
    from PIL import Image

    _positive("--num", args.num)
    _positive("--resample", args.resample)
    if args.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {args.eta}")
    image = open_user_image(args.image)
    mask = open_user_image(args.mask, "mask")
    if mask.size != image.size:
        raise UsageError(f"the mask is {mask.size[0]}x{mask.size[1]} pixels but the image is "
                         f"{image.size[0]}x{image.size[1]}: they must be the same size")
    if not (np.asarray(mask.convert("L")) >= 128).any():
        raise UsageError(f"mask {args.mask} has no white pixels: nothing to fill in")
    pipe = _load(args)
    size = model_size(pipe)
    image = fit(image, size)
    hole = np.asarray(fit(mask, size).convert("L")) >= 128
    if not hole.any():
        raise UsageError(f"the white part of mask {args.mask} vanishes at the model's "
                         f"{size}x{size} pixels: draw a larger hole")
    mask_t = torch.from_numpy(hole.astype(np.float32))[None, None]
    original = _to_unit(image)[None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for k in range(args.num):
        gen = torch.Generator("cpu").manual_seed(args.seed * 1_000_003 + k)
        print(f"inpainting {k + 1}/{args.num} ({args.steps} DDIM steps, resample "
              f"{args.resample})", file=sys.stderr)
        results += pipe.inpaint(original, mask_t, num_inference_steps=args.steps, generator=gen,
                                eta=args.eta, resample_steps=args.resample).images
    masked = np.asarray(image).copy()
    masked[hole] = 128  # the input as the model sees it: the hole carries no information
    pictures = [Image.fromarray(masked), Image.fromarray((hole * 255).astype(np.uint8)), *results]
    names = ["input.png", "mask.png", *[f"result_{k}.png" for k in range(len(results))]]
    _save(pictures, out, names)
    strip(pictures).save(out / "strip.png")
    print(f"input (hole in grey), mask and {len(results)} result(s): {out} (strip.png)")
    return 0


# ---------------------------------------------------------------------------------------------
# command line

def _common(p: argparse.ArgumentParser, out_default: str | None) -> None:
    p.add_argument("--model", required=True, help="exported pipeline folder")
    if out_default is None:
        p.add_argument("--out", required=True, help="output folder")
    else:
        p.add_argument("--out", default=out_default, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add ``interpolate``, ``invert`` and ``inpaint`` to the ``ffhq-ldm`` command line."""
    p = subparsers.add_parser(
        "interpolate", help="frames, a strip and a GIF between two faces",
        formatter_class=DefaultsHelpFormatter,
        description="Spherical interpolation (slerp) between the starting noises of two seeds "
                    "(or of two inverted images), each frame sampled with deterministic DDIM "
                    "(eta 0): the first and last frames are the two faces themselves. Writes "
                    "OUT/frame_NNN.png, OUT/strip.png and OUT/interpolation.gif.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--seeds", default=None, metavar="A,B",
                     help="two seeds; seed S is the noise of torch.Generator().manual_seed(S)")
    src.add_argument("--images", default=None, metavar="FILE,FILE",
                     help="two image files, inverted with DDIM first")
    p.add_argument("--frames", type=int, default=16, help="number of frames, ends included")
    p.add_argument("--batch-size", type=int, default=8, help="frames sampled at once")
    p.add_argument("--frame-ms", type=int, default=120, help="GIF frame duration (ms)")
    _common(p, None)
    p.set_defaults(func=_interpolate)

    p = subparsers.add_parser(
        "invert", help="DDIM-invert images, reconstruct them and make variations",
        formatter_class=DefaultsHelpFormatter,
        description="Encode each image with the autoencoder (posterior mean times the scaling "
                    "factor), run DDIM backwards to its starting noise, and regenerate it "
                    "from that noise (eta 0); reports the reconstruction's PSNR and LPIPS "
                    "(and those of the autoencoder alone, the floor they cannot beat). "
                    "--variations re-samples the inverted noise with --eta > 0. Writes "
                    "NAME_original.png, NAME_reconstruction.png, NAME_variation_K.png, "
                    "NAME_strip.png, NAME_noise.safetensors and metrics.json.")
    p.add_argument("--image", required=True, nargs="+", metavar="FILE", help="image file(s)")
    p.add_argument("--variations", type=int, default=3, help="variations per image (0: none)")
    p.add_argument("--eta", type=float, default=0.5,
                   help="DDIM eta of the variations (0 would repeat the reconstruction)")
    p.add_argument("--seed", type=int, default=0, help="seed of the variations' noise")
    p.add_argument("--perceptual", default="auto", choices=PERCEPTUAL,
                   help="LPIPS variant; auto: VGG LPIPS if its ImageNet trunk is on disk, else "
                        "the random-trunk variant (not the LPIPS metric; the output says which)")
    p.add_argument("--lpips-trunk", default=None, metavar="PATH",
                   help="torchvision ImageNet weights file for LPIPS")
    _common(p, "inversions")
    p.set_defaults(func=_invert)

    p = subparsers.add_parser(
        "inpaint", help="fill in the masked region of an image",
        formatter_class=DefaultsHelpFormatter,
        description="Masked sampling in latent space: after every DDIM step the known part is "
                    "the encoded image noised to that step, blended with the sample through "
                    "the mask taken to the latent grid; --resample U > 1 adds RePaint's "
                    "resampling (Lugmayr et al. 2022). The mask is an image of the same size, "
                    "white = fill in. Writes input.png (hole in grey), mask.png, "
                    "result_K.png and strip.png.")
    p.add_argument("--image", required=True, metavar="FILE", help="image file")
    p.add_argument("--mask", required=True, metavar="FILE",
                   help="mask image of the same size: white (>= 128) = fill in")
    p.add_argument("--num", type=int, default=1, help="results, each with its own noise")
    p.add_argument("--resample", type=int, default=1,
                   help="RePaint resampling per step (1 = none; cost grows with it)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _common(p, "inpainted")
    p.set_defaults(func=_inpaint)


# ---------------------------------------------------------------------------------------------
# for reports

def model_strips(model: str, count: int, steps: int, seed: int, device, out_dir,
                 frames: int = 8) -> list[Path]:
    """``count`` interpolation strips of ``frames`` frames between the seed pairs
    (seed + 2k, seed + 2k + 1), as ``ffhq-ldm interpolate`` makes them; PNGs in
    ``out_dir/interpolations/``."""
    from tqdm.auto import tqdm

    from .sampling import load_pipeline

    pipe = load_pipeline(model, "ddim", "fp32", device)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(out_dir) / "interpolations"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in tqdm(range(count), desc=f"interpolation strips ({frames} frames)", unit="strip"):
        a, b = seed + 2 * k, seed + 2 * k + 1
        start, end = pipe.seed_noise([a, b])
        images = pipe.interpolate(start, end, num_frames=frames, num_inference_steps=steps,
                                  batch_size=frames).images
        path = folder / f"strip_seeds_{a}_{b}.png"
        strip(images).save(path)
        paths.append(path)
    return paths
