"""``report.html``: the evaluation report as one self-contained page.

Everything is inside the file (pictures as base64 ``data:`` URIs, the style inline, no
script), so it opens offline, can be mailed or attached, and shows the same everywhere.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

# What each number means, one sentence each; the papers are those that defined them.
EXPLANATIONS = {
    "fid": "Fréchet distance between Gaussians fitted to the Inception features of the samples "
           "and of the reference images (Heusel et al. 2017, \"GANs Trained by a Two Time-Scale "
           "Update Rule Converge to a Local Nash Equilibrium\"): lower is better, 0 for equal "
           "statistics; biased upward for few samples, so compare it only at equal N.",
    "kid": "Squared maximum mean discrepancy of the same features with a cubic polynomial kernel "
           "(Bińkowski et al. 2018, \"Demystifying MMD GANs\"), mean ± std over random subsets: "
           "unbiased, so a value near 0 (even slightly negative) means indistinguishable at "
           "this sample size.",
    "precision": "Fraction of samples that fall inside the real images' feature manifold (the "
                 "union of k-nearest-neighbour balls; Kynkäänniemi et al. 2019, \"Improved "
                 "Precision and Recall Metric for Assessing Generative Models\"): how many "
                 "samples look like real faces.",
    "recall": "Fraction of real images that fall inside the samples' manifold (same paper): how "
              "much of the variety of real faces the model covers.",
    "memorization_rate": "Fraction of samples whose nearest training image is closer than the "
                         "threshold set by held-out real images, in either the Inception or "
                         "the pixel space: copies of the training set, which should be 0.",
}


def data_uri(path: Path) -> str:
    """A PNG/GIF/JPEG file as a ``data:`` URI."""
    path = Path(path)
    kind = {".png": "png", ".gif": "gif", ".jpg": "jpeg", ".jpeg": "jpeg"}[path.suffix.lower()]
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path, alt: str, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _value(metrics: dict, key: str) -> str:
    if key == "kid":
        return f"{metrics['kid']:.5f} ± {metrics['kid_std']:.5f}"
    if key == "memorization_rate":
        n = metrics.get("settings", {}).get("num_samples", "?")
        return f"{metrics[key]:.4f} ({len(metrics.get('memorized', []))} of {n})"
    if key == "fid":
        return f"{metrics[key]:.3f}"
    return f"{metrics[key]:.4f}"


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1.5em auto; padding: 0 1em;
       color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 0.35em 0.7em; text-align: left; vertical-align: top; }
td.value { font-family: monospace; white-space: nowrap; }
figure { margin: 1em 0; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def write_html_report(out_dir, metrics: dict, samples_grid: Path | None, neighbours: Path | None,
                      histogram: Path | None, strips: list[Path] | None = None) -> Path:
    """Write ``out_dir/report.html``: the metrics with what they mean, the sample grid, the
    nearest-neighbour picture, the distance histogram and any interpolation strips."""
    rows = []
    names = {"fid": "FID", "kid": "KID", "precision": "precision", "recall": "recall",
             "memorization_rate": "memorisation rate"}
    for key, label in names.items():
        if key in metrics and metrics[key] is not None:
            value = html.escape(_value(metrics, key))
            rows.append(f'<tr><th>{label}</th><td class="value">{value}</td>'
                        f"<td>{html.escape(EXPLANATIONS[key])}</td></tr>")
    settings = metrics.get("settings", {})
    if settings.get("model"):
        source = (f"from {settings['model']} ({settings.get('sampler')}, "
                  f"{settings.get('steps')} steps)")
    else:
        source = f"from {settings.get('samples')}"
    intro = (f"{settings.get('num_samples', '?')} samples {source}, reference "
             f"{settings.get('reference')}.")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>FaceLDM evaluation report</title>", f"<style>{STYLE}</style></head><body>",
             "<h1>FaceLDM evaluation report</h1>", f"<p>{html.escape(intro)}</p>",
             "<h2>Scores</h2>",
             "<table><tr><th>metric</th><th>value</th><th>what it means</th></tr>",
             *rows, "</table>"]
    if metrics.get("memorized"):
        parts.append("<p>Flagged samples: " + html.escape(", ".join(metrics["memorized"])) + "</p>")
    if samples_grid is not None:
        parts += ["<h2>Samples</h2>",
                  _figure(samples_grid, "sample grid", "The first samples, in order.")]
    if strips:
        parts.append("<h2>Interpolations</h2>")
        parts += [_figure(p, "interpolation strip", f"{Path(p).name}: deterministic DDIM along "
                          "the slerp path between two starting noises.") for p in strips]
    if neighbours is not None:
        parts += ["<h2>Nearest training images</h2>",
                  _figure(neighbours, "nearest training images",
                          "Each row: a sample (red frame = flagged as memorised) and its nearest "
                          "training images per space, flagged and closest samples first.")]
    if histogram is not None:
        parts += ["<h2>Nearest-training-image distances</h2>",
                  _figure(histogram, "distance histograms",
                          "Distance of each sample (blue) and each held-out real image (orange) "
                          "to its nearest training image; the red line is the memorisation "
                          "threshold.")]
    parts += ["<h2>Settings</h2>",
              f"<pre>{html.escape(json.dumps(settings, indent=2, sort_keys=True))}</pre>",
              "</body></html>", ""]
    path = Path(out_dir) / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
