"""A few printed lines that say how good a set of samples is, beside what is attainable.

The second row of the table is the reference point of :func:`calc.reference_point`: training
images scored against the same reference as the samples. With a reference built from held-out
images, it is the score of a model that draws exactly the training distribution at the same
sample count, so the samples' row is read against it rather than against zero.
"""

from __future__ import annotations

from pathlib import Path


def _row(name: str, m: dict) -> str:
    return (f"  {name:<17}{m['fid']:>9.2f}{m['kid']:>9.4f}{m['precision']:>11.3f}"
            f"{m['recall']:>8.3f}")


def summary_lines(metrics: dict, out_dir: str | Path) -> list[str]:
    """The printed table; empty for metrics without their settings (nothing to say it of)."""
    settings = metrics.get("settings")
    if not settings:
        return []
    n, n_ref = settings["num_samples"], settings["reference_num_images"]
    lines = [f"quality of {n} samples against the reference ({n_ref} images):",
             f"  {'':<17}{'FID':>9}{'KID':>9}{'precision':>11}{'recall':>8}",
             _row("samples", metrics)]
    base = metrics.get("reference_point")
    if base:
        lines.append(_row(f"{base['num']} train images", base) + "  <- attainable")
        lines.append(f"  FID ratio samples / train images: {metrics['fid'] / base['fid']:.2f}")
    flagged = len(metrics["memorized"])
    lines.append(f"  memorised: {flagged} of {n} samples ({flagged / n:.1%}) against "
                 f"{settings['num_train']} training images; nearest neighbours: "
                 f"{Path(out_dir) / 'neighbours.png'}")
    return lines
