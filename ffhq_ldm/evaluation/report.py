"""Pictures and the human-readable report for an evaluation run (PIL only, no matplotlib)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .caveats import small_sample_caveat
from .uniqueness import SpaceResult

_BG = (255, 255, 255)
_SAMPLE_COLOR = (31, 119, 180)
_HOLDOUT_COLOR = (255, 127, 14)
_THRESH_COLOR = (214, 39, 40)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def choose_grid_rows(results: list[SpaceResult], flags: np.ndarray,
                     max_rows: int = 16) -> list[int]:
    """Flagged samples first, then the samples closest to the training set (by ratio to each
    space's threshold)."""
    closeness = np.min(
        [r.sample_dist[:, 0] / max(r.threshold, 1e-12) for r in results], axis=0
    )
    order = sorted(range(len(flags)), key=lambda i: (not flags[i], closeness[i]))
    return order[:max_rows]


def neighbour_grid(
    samples: np.ndarray,
    train_loader,
    rows: Sequence[int],
    results: list[SpaceResult],
    flags: np.ndarray,
    sample_names: Sequence[str],
    out_path: str,
    thumb: int = 96,
) -> str:
    """PNG: each row = sample, then its nearest training images in every space (3 per space).

    ``train_loader(indices) -> uint8 (n, H, W, 3)`` loads training images by index.
    Flagged samples get a red frame; each neighbour is labelled with its distance.
    """
    font = _font(11)
    k = max(r.sample_idx.shape[1] for r in results)
    gap, label_h, pad = 12, 14, 4
    width = pad + thumb + sum(gap + k * (thumb + pad) for _ in results)
    header = 18
    height = header + len(rows) * (thumb + label_h + pad) + pad
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    x = pad + thumb
    draw.text((pad, 2), "sample", fill=(0, 0, 0), font=font)
    for r in results:
        draw.text((x + gap, 2), f"nearest train ({r.name})", fill=(0, 0, 0), font=font)
        x += gap + k * (thumb + pad)

    def thumb_img(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).resize((thumb, thumb), Image.LANCZOS)

    for row, i in enumerate(rows):
        y = header + row * (thumb + label_h + pad)
        canvas.paste(thumb_img(samples[i]), (pad, y))
        if flags[i]:
            draw.rectangle([pad - 2, y - 2, pad + thumb + 1, y + thumb + 1], outline=_THRESH_COLOR,
                           width=3)
        draw.text((pad, y + thumb + 1), os.path.basename(sample_names[i])[:16], fill=(0, 0, 0),
                  font=font)
        x = pad + thumb
        for r in results:
            x += gap
            idx = r.sample_idx[i]
            imgs = train_loader(list(idx))
            for j, im in enumerate(imgs):
                canvas.paste(thumb_img(im), (x, y))
                color = _THRESH_COLOR if r.sample_dist[i, j] <= r.threshold else (0, 0, 0)
                draw.text((x, y + thumb + 1), f"d={r.sample_dist[i, j]:.4f}", fill=color, font=font)
                x += thumb + pad
            x += (k - len(idx)) * (thumb + pad)
    canvas.save(out_path)
    return out_path


def histogram_image(results: list[SpaceResult], out_path: str, bins: int = 40, w: int = 640,
                    h: int = 220) -> str:
    """PNG with one panel per space: nearest-train distance histograms of samples vs held-out,
    threshold line."""
    font = _font(12)
    margin_l, margin_b, margin_t = 40, 34, 22
    canvas = Image.new("RGB", (w, h * len(results)), _BG)
    for p, r in enumerate(results):
        panel = Image.new("RGBA", (w, h), _BG + (255,))
        overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        d = ImageDraw.Draw(overlay)
        s = r.sample_dist[:, 0]
        ho = r.holdout_dist
        lo = 0.0
        hi = float(max(s.max(), ho.max(), r.threshold)) * 1.05 or 1.0
        edges = np.linspace(lo, hi, bins + 1)
        hs = np.histogram(s, edges)[0] / max(len(s), 1)
        hh = np.histogram(ho, edges)[0] / max(len(ho), 1)
        top = max(hs.max(), hh.max(), 1e-9)
        pw, ph = w - margin_l - 10, h - margin_b - margin_t

        def xpix(v, lo=lo, hi=hi, pw=pw):
            return margin_l + (v - lo) / (hi - lo) * pw

        for hist, color in ((hh, _HOLDOUT_COLOR), (hs, _SAMPLE_COLOR)):
            for b in range(bins):
                if hist[b] <= 0:
                    continue
                y0 = margin_t + ph * (1 - hist[b] / top)
                d.rectangle([xpix(edges[b]), y0, xpix(edges[b + 1]) - 1, margin_t + ph],
                            fill=color + (120,))
        panel = Image.alpha_composite(panel, overlay)
        dd = ImageDraw.Draw(panel)
        dd.line([margin_l, margin_t + ph, margin_l + pw, margin_t + ph], fill=(0, 0, 0))
        dd.line([margin_l, margin_t, margin_l, margin_t + ph], fill=(0, 0, 0))
        tx = xpix(r.threshold)
        dd.line([tx, margin_t, tx, margin_t + ph], fill=_THRESH_COLOR, width=2)
        dd.text((margin_l, 3), f"{r.name}: nearest-train distance", fill=(0, 0, 0), font=font)
        dd.text((w - 330, 3), "samples", fill=_SAMPLE_COLOR, font=font)
        dd.text((w - 260, 3), "held-out", fill=_HOLDOUT_COLOR, font=font)
        dd.text((w - 190, 3), f"threshold {r.threshold:.4g}", fill=_THRESH_COLOR, font=font)
        for v in np.linspace(lo, hi, 5):
            dd.text((min(xpix(v) - 12, w - 44), margin_t + ph + 4), f"{v:.3g}", fill=(0, 0, 0),
                    font=font)
        dd.text((2, margin_t), f"{top:.2f}", fill=(0, 0, 0), font=font)
        canvas.paste(panel.convert("RGB"), (0, p * h))
    canvas.save(out_path)
    return out_path


def histogram_table(r: SpaceResult, bins: int = 10) -> str:
    """Markdown table of the same histogram (fractions per bin)."""
    hi = float(max(r.sample_dist[:, 0].max(), r.holdout_dist.max())) or 1.0
    edges = np.linspace(0.0, hi, bins + 1)
    hs = np.histogram(r.sample_dist[:, 0], edges)[0] / len(r.sample_dist)
    hh = np.histogram(r.holdout_dist, edges)[0] / len(r.holdout_dist)
    lines = ["| distance bin | samples | held-out |", "|---|---|---|"]
    for b in range(bins):
        lines.append(f"| {edges[b]:.4g} - {edges[b + 1]:.4g} | {hs[b]:.3f} | {hh[b]:.3f} |")
    return "\n".join(lines)


def write_report(out_dir: str, metrics: dict, results: list[SpaceResult], grid_png: str,
                 hist_png: str) -> str:
    """Write ``report.md`` next to ``metrics.json``."""
    s = metrics["settings"]
    caveat = small_sample_caveat(s["num_samples"], s.get("reference_num_images"))
    lines = [
        "# FaceLDM evaluation report",
        "",
        "## Scores",
        "",
        "| metric | value |",
        "|---|---|",
        f"| FID (Heusel et al. 2017) | {metrics['fid']:.3f} |",
        f"| KID (Bińkowski et al. 2018), mean ± std over subsets | {metrics['kid']:.5f} "
        f"± {metrics['kid_std']:.5f} |",
        f"| precision (Kynkäänniemi et al. 2019, k={s['pr_k']}) | {metrics['precision']:.4f} |",
        f"| recall | {metrics['recall']:.4f} |",
        f"| memorisation rate (either space) | {metrics['memorization_rate']:.4f} "
        f"({len(metrics['memorized'])} of {s['num_samples']}) |",
        "",
        "FID/KID/precision/recall compare the samples with the reference statistics; "
        f"precision/recall use {s['pr_num']} images of each set (equal sizes, as in the paper).",
        "",
        *([f"Caveat: {caveat.removeprefix('note: ')}.", ""] if caveat else []),
        "## Uniqueness",
        "",
        "A sample is flagged as memorised when its nearest-training-image distance is at most "
        f"`{s['memo_scale']} x` the `{s['memo_quantile']}` quantile of the same distance for "
        "held-out real images (held-out baseline: " + s["holdout"] + ").",
        "",
        "| space | threshold | flagged | rate | sample median NN | held-out median NN | held-out "
        "1% NN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sm = r.summary()
        lines.append(
            f"| {r.name} | {r.threshold:.5g} | {sm['num_flagged']} | "
            f"{sm['memorization_rate']:.4f} | "
            f"{sm['sample_nn_quantiles']['0.5']:.5g} | {sm['holdout_nn_quantiles']['0.5']:.5g} | "
            f"{sm['holdout_nn_quantiles']['0.01']:.5g} |"
        )
    if any("random-trunk" in r.name for r in results):
        lines += ["",
                  "The random-trunk LPIPS row is a smoke test, not the LPIPS metric; it does not "
                  "flag samples."]
    lines += ["",
              "KID is an unbiased estimate, so values slightly below 0 mean 'indistinguishable at "
              "this sample size'."]
    flagged = ", ".join(metrics["memorized"]) if metrics["memorized"] else "none"
    lines += ["", f"Flagged samples: {flagged}", ""]
    lines += [f"![nearest training images]({os.path.basename(grid_png)})", "",
              "Each row: a sample (red frame = flagged) and its 3 nearest training images per "
              "space, "
              "flagged and closest samples first.", "",
              f"![nearest-train distance histograms]({os.path.basename(hist_png)})", ""]
    for r in results:
        lines += [f"### Nearest-train distances, {r.name}", "", histogram_table(r), ""]
    lines += ["## Settings", "", "```json", json.dumps(s, indent=2, sort_keys=True), "```", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path
