"""``evaluate calc``: score samples (a folder, or generated from a pipeline) against reference
statistics.

Steps: Inception features of the samples -> FID / KID / precision-recall
against the reference; nearest training images in Inception and pixel space
-> memorisation flags against a held-out baseline; then ``metrics.json``,
``report.md``, ``report.html`` (self-contained), ``neighbours.png``, ``nn_hist.png``,
``samples_grid.png`` and ``uniqueness.csv`` in the output folder (and, with ``--model``,
interpolation strips in ``interpolations/``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import PERCEPTUAL_CHOICES as LPIPS_CHOICES
from ..visual import save_grid
from .errors import EvaluationError
from .features import (
    InceptionFeatureExtractor,
    default_batch_size,
    fingerprint_sha256,
    get_extractor,
)
from .html_report import write_html_report
from .images import (
    center_crop_resize,
    iter_image_batches,
    list_images,
    load_images,
    relative_names,
)
from .metrics import fid_features_vs_stats, kid, precision_recall
from .reference import load_reference, select_subset
from .report import choose_grid_rows, histogram_image, neighbour_grid, write_report
from .uniqueness import analyse_space, combine_flags, lpips_space, pixel_vectors


def generate_samples(
    model: str, num: int, steps: int, sampler: str, seed: int, batch_size: int,
    device: torch.device, out_dir: str, resolution: int,
) -> tuple[np.ndarray, list[str]]:
    """Sample ``num`` images from an exported FaceLDMPipeline folder; saves PNGs, returns uint8
    arrays + names.

    Draws through ``ffhq_ldm.sampling.sample_images``, as ``ffhq-ldm sample`` does: image ``i`` of
    ``seed`` is the same image there and here, whatever the batch size. On CUDA the VAE decoder
    is compiled (``FFHQ_LDM_COMPILE=0/1`` decides otherwise); PNGs are written on background
    threads while the next batch samples.
    """
    from PIL import Image

    from ffhq_ldm.cli_common import UsageError
    from ffhq_ldm.sampling import PngWriter, load_pipeline, sample_images
    from ffhq_ldm.speed import compile_wanted, maybe_compile

    if num < 1 or steps < 1:
        raise EvaluationError("--num and --steps must be positive")
    try:
        pipe = load_pipeline(model, sampler, "fp32", device)
    except (UsageError, OSError, ValueError) as exc:
        raise EvaluationError(f"cannot load pipeline {model!r}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    compiled = compile_wanted(pipe.unet, None)  # static shapes: every batch at batch_size
    maybe_compile(pipe.vae.decoder, enabled=compiled, in_place=True)
    folder = Path(out_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    chunks, paths = [], []
    with PngWriter() as writer:
        for start, u8 in sample_images(pipe, num, seed=seed, steps=steps, batch_size=batch_size,
                                       fixed_batch=compiled,
                                       desc=f"sampling ({sampler}, {steps} steps)"):
            if u8.shape[1] != resolution or u8.shape[2] != resolution:
                u8 = np.stack([center_crop_resize(Image.fromarray(a), resolution) for a in u8])
            chunks.append(u8)
            for i, image in enumerate(u8):  # the names save_images gives
                paths.append(str(folder / f"sample_{start + i:06d}.png"))
                writer.write(paths[-1], image)
    return np.concatenate(chunks), relative_names(paths, out_dir)


def build_lpips(kind: str, trunk_path: str | None = None):
    """LPIPS module via the project's offline loader (ImageNet trunk from the torch hub cache or
    ``trunk_path``).

    ``lpips-vgg-random-trunk`` is NOT the LPIPS metric (random trunk); it exists for offline
    smoke tests.
    """
    if kind not in LPIPS_CHOICES:
        raise EvaluationError(f"--lpips must be one of {', '.join(LPIPS_CHOICES)}, got {kind!r}")
    from ffhq_ldm.losses.perceptual import PerceptualWeightsError, build_perceptual

    try:
        return build_perceptual(kind, trunk_path)
    except PerceptualWeightsError as exc:
        raise EvaluationError(str(exc).replace("--perceptual", "--lpips")) from exc


def _train_inception_features(
    extractor, ref: dict, train_names: Sequence[str], train_paths: Sequence[str], resolution: int,
    bs: int,
) -> np.ndarray:
    """Reuse reference features for training images the reference covers; extract the rest."""
    pos = {n: i for i, n in enumerate(ref["names"])}
    feats = np.zeros((len(train_names), ref["features"].shape[1]), dtype=np.float32)
    missing = [j for j, n in enumerate(train_names) if n not in pos]
    for j, n in enumerate(train_names):
        if n in pos:
            feats[j] = ref["features"][pos[n]]
    if missing:
        tqdm.write(f"reference does not cover {len(missing)} of {len(train_names)} training "
                   "images; extracting them")
        feats[missing] = extractor.extract_paths([train_paths[j] for j in missing], resolution,
                                                 bs, "train features")
    return feats


def _check_inputs(ref_path: str, data_dir: str, samples_dir: str | None, model: str | None,
                  holdout_dir: str | None, holdout_fraction: float, strips=()):
    """Cheap input checks, before any model is loaded: (train, sample, held-out image paths)."""
    if (samples_dir is None) == (model is None):
        raise EvaluationError("give exactly one of --samples DIR or --model PIPELINE")
    for strip in strips:  # interpolation strips for report.html
        if not Path(strip).is_file():
            raise EvaluationError(f"strip image not found: {strip}")
    train_paths = list_images(data_dir, "training data folder")
    sample_paths = list_images(samples_dir, "samples folder") if samples_dir else None
    holdout_paths = None
    if holdout_dir:
        holdout_paths = list_images(holdout_dir, "held-out folder")
    elif not 0.0 < holdout_fraction < 1.0:
        raise EvaluationError(f"--holdout-fraction must be in (0, 1), got {holdout_fraction}")
    if model is not None and not (Path(model) / "model_index.json").is_file():
        raise EvaluationError(f"--model {model!r} is not an exported pipeline folder "
                              "(no model_index.json)")
    if not Path(ref_path).is_file():
        raise EvaluationError(f"reference statistics file not found: {ref_path!r} "
                              "(create it with 'evaluate ref')")
    return train_paths, sample_paths, holdout_paths


def _distribution_metrics(sample_feats: np.ndarray, ref: dict, kid_subsets: int,
                          kid_subset_size: int, pr_k: int, seed: int, dev) -> dict:
    """FID and KID against the reference, precision/recall on equal-sized subsets."""
    n = len(sample_feats)
    fid = fid_features_vs_stats(sample_feats, ref["mu"], ref["sigma"])
    kid_mean, kid_std = kid(sample_feats, ref["features"], kid_subsets, kid_subset_size, seed)
    pr_num = min(n, len(ref["features"]))
    rng = np.random.default_rng(seed)
    real_sub = ref["features"][np.sort(rng.choice(len(ref["features"]), pr_num, replace=False))]
    fake_sub = sample_feats[np.sort(rng.choice(n, pr_num, replace=False))]
    precision, recall = precision_recall(real_sub, fake_sub, pr_k, device=dev)
    return {"fid": fid, "kid": kid_mean, "kid_std": kid_std, "precision": precision,
            "recall": recall, "pr_num": pr_num}


def _holdout_set(holdout_paths, holdout_dir, holdout_fraction, train_feats, train_pix,
                 extractor, resolution, bs, seed, dev):
    """(images or None, Inception features, pixel vectors, excluded training indices or None,
    description) of the held-out baseline: a separate folder, or left-out training images."""
    if holdout_dir:
        images = load_images(holdout_paths, resolution)
        feats = extractor.extract_arrays(images, bs, desc="held-out features")
        desc = f"separate folder {os.path.abspath(holdout_dir)} ({len(holdout_paths)} images)"
        return images, feats, pixel_vectors(images, device=dev), None, desc
    n_train = len(train_feats)
    n_h = int(round(holdout_fraction * n_train))
    n_h = min(max(n_h, 1), n_train - 1)
    exclude = np.sort(np.random.default_rng(seed + 1).choice(n_train, n_h, replace=False))
    desc = (f"leave-one-out: {n_h} training images ({holdout_fraction:.0%}), each compared with "
            "the other training images")
    return None, train_feats[exclude], train_pix[exclude], exclude, desc


def _write_uniqueness_csv(path: Path, results, flags, sample_names, train_names) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sample", "memorized"]
                   + [c for r in results for c in (f"{r.name} d1", f"{r.name} nearest")])
        for i, name in enumerate(sample_names):
            row = [name, int(flags[i])]
            for r in results:
                row += [f"{r.sample_dist[i, 0]:.6g}",
                        ";".join(train_names[j] for j in r.sample_idx[i])]
            w.writerow(row)


def _nearest_neighbours(samples, sample_feats, ref, train_paths, train_names, holdout_paths,
                        holdout_dir, holdout_fraction, extractor, resolution, bs, seed, dev, kw,
                        lpips, lpips_net):
    """Nearest training images of every sample in each space, against a held-out baseline:
    (per-space results, a loader of training images by index, the baseline's description, the
    training images' Inception features)."""
    train_feats = _train_inception_features(extractor, ref, train_names, train_paths, resolution,
                                            bs)
    batches = tqdm(iter_image_batches(train_paths, resolution, 256), desc="train pixels",
                   unit="batch", leave=False)
    train_pix = np.concatenate([pixel_vectors(b, device=dev) for b in batches])
    holdout_images, holdout_feats, holdout_pix, exclude, holdout_desc = _holdout_set(
        holdout_paths, holdout_dir, holdout_fraction, train_feats, train_pix, extractor,
        resolution, bs, seed, dev)
    results = [
        analyse_space("inception (cosine)", sample_feats, train_feats, holdout_feats, "cosine",
                      exclude, **kw),
        analyse_space("pixel 64x64 (RMSE)", pixel_vectors(samples, device=dev), train_pix,
                      holdout_pix, "l2", exclude, **kw),
    ]

    def train_loader(idx):
        return load_images([train_paths[j] for j in idx], resolution)

    if lpips_net is not None:
        held = holdout_images if holdout_dir else train_loader(list(exclude))
        cands = [np.concatenate([r.sample_idx for r in results], 1),
                 np.concatenate([r.holdout_idx for r in results], 1)]
        results.append(lpips_space(lpips_net.to(dev), samples, held, train_loader, cands[0],
                                   cands[1], name=f"{lpips} (re-ranked)", **kw))
    return results, train_loader, holdout_desc, train_feats


def reference_point(train_feats: np.ndarray, n: int, ref: dict, kid_subsets: int,
                    kid_subset_size: int, pr_k: int, seed: int, dev) -> dict | None:
    """The same distribution metrics for ``n`` training images (a seeded subset) in place of
    the samples: what a model that draws exactly the training distribution would score against
    this reference at this sample count. Meaningful when the reference is built from images
    the model never trained on (a held-out folder); None when fewer than ``n`` are at hand."""
    if len(train_feats) < n:
        return None
    pick = np.sort(np.random.default_rng(seed + 2).choice(len(train_feats), n, replace=False))
    out = _distribution_metrics(train_feats[pick], ref, kid_subsets, kid_subset_size, pr_k,
                                seed, dev)
    out["num"] = n
    return out


def run_calc(
    ref_path: str, data_dir: str, out_dir: str, samples_dir: str | None = None,
    model: str | None = None, num: int = 10000, steps: int = 50, sampler: str = "ddim",
    seed: int = 0, holdout_dir: str | None = None, holdout_fraction: float = 0.1,
    resolution: int = 128, batch_size: int | None = None, device: str = "auto",
    inception: str | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
    pr_k: int = 3, memo_quantile: float = 0.01, memo_scale: float = 0.5,
    max_train: int | None = None, grid_rows: int = 16, lpips: str = "none",
    lpips_trunk: str | None = None, extractor: InceptionFeatureExtractor | None = None,
    strips: Sequence[str] = (), interpolations: int = 2,
) -> dict:
    train_paths, sample_paths, holdout_paths = _check_inputs(
        ref_path, data_dir, samples_dir, model, holdout_dir, holdout_fraction, strips)
    lpips_net = build_lpips(lpips, lpips_trunk) if lpips != "none" else None  # fail fast
    if extractor is None:
        extractor = get_extractor(inception, device)
    dev, fp = extractor.device, extractor.fingerprint(resolution)
    bs = batch_size or default_batch_size(dev)
    ref = load_reference(ref_path, fp)
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    # --- samples -------------------------------------------------------------------------------
    if model is not None:
        samples, sample_names = generate_samples(model, num, steps, sampler, seed, bs, dev,
                                                 out_dir, resolution)
    else:
        samples = load_images(sample_paths, resolution)
        sample_names = relative_names(sample_paths, samples_dir)
    n = len(samples)
    if n < pr_k + 1:
        raise EvaluationError(f"need at least {pr_k + 1} samples, got {n}")
    sample_feats = extractor.extract_arrays(samples, bs, desc="sample features")

    # --- distribution metrics ----------------------------------------------------------------
    dist = _distribution_metrics(sample_feats, ref, kid_subsets, kid_subset_size, pr_k, seed,
                                 dev)

    # --- uniqueness --------------------------------------------------------------------------
    keep = select_subset(len(train_paths), max_train, seed)
    train_paths = [train_paths[i] for i in keep]
    train_names = relative_names(train_paths, data_dir)
    if len(train_paths) < 2:
        raise EvaluationError("need at least 2 training images for the nearest-neighbour analysis")
    kw = dict(quantile=memo_quantile, scale=memo_scale, device=dev)
    results, train_loader, holdout_desc, train_feats = _nearest_neighbours(
        samples, sample_feats, ref, train_paths, train_names, holdout_paths, holdout_dir,
        holdout_fraction, extractor, resolution, bs, seed, dev, kw, lpips, lpips_net)
    # A random-trunk LPIPS is not a perceptual metric: report it, but do not let it flag samples.
    flags = combine_flags([r for r in results if "random-trunk" not in r.name])
    memorized = [sample_names[i] for i in np.flatnonzero(flags)]

    # --- outputs -----------------------------------------------------------------------------
    settings = {
        "num_samples": n, "samples": os.path.abspath(samples_dir) if samples_dir else None,
        "model": os.path.abspath(model) if model else None,
        "sampler": sampler if model else None, "steps": steps if model else None,
        "seed": seed, "resolution": resolution, "reference": os.path.abspath(ref_path),
        "reference_num_images": len(ref["features"]), "data": os.path.abspath(data_dir),
        "num_train": len(train_paths), "holdout": holdout_desc,
        "inception_source": extractor.source.origin, "inception_sha256": extractor.source.sha256,
        "fingerprint": fp, "fingerprint_sha256": fingerprint_sha256(fp),
        "kid_subsets": kid_subsets, "pr_k": pr_k, "pr_num": dist["pr_num"],
        "kid_subset_size": min(kid_subset_size, n, len(ref["features"])),
        "memo_quantile": memo_quantile, "memo_scale": memo_scale, "device": str(dev),
        "lpips": lpips,
    }
    metrics = {
        "fid": dist["fid"], "kid": dist["kid"], "kid_std": dist["kid_std"],
        "precision": dist["precision"], "recall": dist["recall"],
        "memorization_rate": float(flags.mean()), "memorized": memorized,
        "uniqueness": {r.name: r.summary() for r in results}, "settings": settings,
        "reference_point": reference_point(train_feats, n, ref, kid_subsets,
                                           kid_subset_size, pr_k, seed, dev)}
    # Key settings also at top level, for scripts that read a few fields.
    for key in ("num_samples", "sampler", "steps", "seed", "inception_source", "inception_sha256",
                "fingerprint", "fingerprint_sha256"):
        metrics[key] = settings[key]
    _write_outputs(out_dir, metrics, results, flags, samples, sample_names, train_names,
                   train_loader, grid_rows, strips, model, interpolations, steps, seed, dev)
    return metrics


def _write_outputs(out_dir, metrics, results, flags, samples, sample_names, train_names,
                   train_loader, grid_rows, strips, model, interpolations, steps, seed,
                   device) -> None:
    """metrics.json, uniqueness.csv, neighbours.png, nn_hist.png, report.md, samples_grid.png
    and report.html (with interpolation strips: given ones, and drawn from ``model``)."""
    out = Path(out_dir)
    with (out / "metrics.json").open("w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    _write_uniqueness_csv(out / "uniqueness.csv", results, flags, sample_names, train_names)
    rows = choose_grid_rows(results, flags, grid_rows)
    grid = neighbour_grid(samples, train_loader, rows, results, flags, sample_names,
                          str(out / "neighbours.png"))
    hist = histogram_image(results, str(out / "nn_hist.png"))
    write_report(out_dir, metrics, results, grid, hist)
    sample_grid = out / "samples_grid.png"
    save_grid(samples[:64], sample_grid)
    strip_paths = list(strips)
    if model is not None and interpolations > 0:
        from ffhq_ldm.explore import model_strips

        strip_paths += model_strips(model, interpolations, steps, seed, device, out_dir)
    write_html_report(out_dir, metrics, str(sample_grid), grid, hist, strip_paths)
