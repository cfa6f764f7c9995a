"""``ffhq-ldm ema``: the EMA of any length, after training, from a run's post-hoc EMA snapshots.

    ffhq-ldm ema --run runs/unet --sigma-rel 0.08 --out runs/unet/pipeline-ema0.08
    ffhq-ldm ema --run runs/unet --sigma-rel 0.03,0.05,0.08,0.12,0.2 --out runs/ema-sweep \\
        --evaluate --num 500

The run must have been trained with ``--posthoc-ema`` (training/train_unet.py). For each
sigma_rel, the snapshots' least-squares combination that best matches the power-function EMA
profile of that length (Karras et al., EDM2, CVPR 2024, appendix C.3; see
``ffhq_ldm.train.posthoc_ema``) is written as a complete pipeline folder: ``OUT`` itself for one
value, ``OUT/sigma_rel-S/`` for several. With ``--evaluate``, each one and the run's own
pipeline (LDM's EMA, the default export) are sampled and scored with ``ffhq-ldm evaluate calc``'s
code (FID, KID, precision/recall against reference Inception statistics of the training
images), and ``OUT/posthoc_ema.md``, ``OUT/posthoc_ema.json`` and ``OUT/fid_vs_sigma_rel.png``
are written. FID over few samples is biased upward: compare rows only at equal ``--num``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .cli_common import DefaultsHelpFormatter, UsageError
from .train.options import float_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the training output folder (--output-dir)")
    p.add_argument("--sigma-rel", required=True, type=float_list, metavar="S[,S2,...]",
                   help="relative standard deviation(s) of the EMA profile to reconstruct")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--step", type=int, default=None,
                   help="reconstruct the EMA as of this snapshot's step (default: the last)")
    p.add_argument("--evaluate", action="store_true",
                   help="sample and score each reconstruction and the run's LDM EMA pipeline")
    p.add_argument("--ref", default=None,
                   help="reference Inception statistics (ffhq-ldm evaluate ref); default: "
                        "computed from --data into OUT/reference.npz (reused when there)")
    p.add_argument("--data", default=None,
                   help="training images (default: the run's, from its config.json)")
    p.add_argument("--num", type=int, default=500, help="samples per model with --evaluate")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps with --evaluate")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for every row)")
    p.add_argument("--batch-size", type=int, default=None, help="sampling/feature batch size")
    p.add_argument("--max-train", type=int, default=500,
                   help="training images compared in the nearest-neighbour check")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--inception", default=None, help="Inception weights file (see evaluate)")


class _HelpFormatter(DefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the module docstring's layout kept."""


def register(subparsers) -> None:
    """Add ``ema`` to the ``ffhq-ldm`` command line."""
    p = subparsers.add_parser(
        "ema", help="reconstruct (and score) the EMA of any length from post-hoc EMA snapshots",
        description=__doc__, formatter_class=_HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------

def export_reconstruction(run_dir: Path, sigma_rel: float, out_dir: Path,
                          step: int | None = None, device: str = "cpu") -> dict:
    """Write the pipeline folder of post-hoc EMA ``sigma_rel``; returns the recipe's facts."""
    from .sampling import load_pipeline
    from .train.export import export_pipeline
    from .train.posthoc_ema import plan, reconstruct

    recipe = plan(run_dir, sigma_rel, step)
    pipe = load_pipeline(str(run_dir / "pipeline"), device="cpu")
    names = [n for n, _ in pipe.unet.named_parameters()]
    weights = reconstruct(recipe, names)
    missing, unexpected = pipe.unet.load_state_dict(weights, strict=False)
    buffers = {n for n, _ in pipe.unet.named_buffers()}
    if unexpected or set(missing) - buffers:
        raise UsageError(f"the snapshots in {run_dir} do not fit the run's pipeline UNet")
    card = _card(run_dir, recipe)
    export_pipeline(pipe, out_dir, card)
    snapshots = len({path for path, _, _ in recipe["entries"]})
    return {"sigma_rel": sigma_rel, "gamma": recipe["gamma"], "step": recipe["step"],
            "num_updates": recipe["num_updates"], "snapshots": snapshots,
            "fit_error": recipe["fit_error"], "pipeline": str(out_dir)}


def _card(run_dir: Path, recipe: dict) -> dict:
    config = json.loads((run_dir / "config.json").read_text())
    run, unet = config.get("run", {}), config.get("unet", {})
    snapshots = len({path for path, _, _ in recipe["entries"]})
    return {"data": run.get("data"), "preset": run.get("preset"), "step": recipe["step"],
            "batch_size": run.get("global_batch"),
            "images_seen": recipe["step"] * run["global_batch"] if run.get("global_batch")
            else "unknown",
            "ema_decay": unet.get("ema_decay"),
            "weights": (f"post-hoc EMA (Karras et al. 2024): power-function profile sigma_rel "
                        f"{recipe['sigma_rel']:g} (gamma {recipe['gamma']:.3f}) at step "
                        f"{recipe['step']}, least-squares combination of {snapshots} "
                        f"snapshots, relative profile error {recipe['fit_error']:.2e}")}


def run(args) -> int:
    run_dir, out = Path(args.run), Path(args.out)
    if not (run_dir / "pipeline" / "model_index.json").is_file():
        raise UsageError(f"--run {run_dir}: no pipeline/ folder (not a finished UNet run?)")
    if args.num < 4 or args.steps < 1:
        raise UsageError("--num must be >= 4 and --steps >= 1")
    single = len(args.sigma_rel) == 1 and not args.evaluate
    rows = []
    for s in args.sigma_rel:
        target = out if single else out / f"sigma_rel-{s:g}"
        row = export_reconstruction(run_dir, s, target, args.step)
        print(f"sigma_rel {s:g} (gamma {row['gamma']:.3f}): {row['snapshots']} snapshots up to "
              f"step {row['step']}, relative profile error {row['fit_error']:.2e} -> {target}")
        rows.append(row)
    if args.evaluate:
        from .evaluation.errors import EvaluationError

        try:
            rows = evaluate(args, run_dir, out, rows)
        except EvaluationError as exc:
            raise UsageError(str(exc)) from None
        print(f"wrote {out / 'posthoc_ema.md'} and {out / 'fid_vs_sigma_rel.png'}")
    return 0


def evaluate(args, run_dir: Path, out: Path, rows: list[dict]) -> list[dict]:
    """Sample and score every reconstruction and the run's own LDM EMA pipeline."""
    from .evaluation.calc import run_calc
    from .evaluation.features import get_extractor
    from .evaluation.reference import compute_reference

    config = json.loads((run_dir / "config.json").read_text())
    data = args.data or config.get("run", {}).get("data")
    if not data or not Path(data).is_dir():
        raise UsageError(f"--data: training image folder {data!r} not found")
    resolution = _resolution(run_dir)
    extractor = get_extractor(args.inception, args.device)
    ref = Path(args.ref) if args.ref else out / "reference.npz"
    if not ref.is_file():
        compute_reference(data, str(ref), extractor, resolution=resolution,
                          batch_size=args.batch_size)
    ldm = {"sigma_rel": None, "pipeline": str(run_dir / "pipeline"),
           "label": f"LDM EMA (decay {config.get('unet', {}).get('ema_decay')})"}
    scored = []
    for row in [*rows, ldm]:
        name = "ldm-ema" if row["sigma_rel"] is None else f"sigma_rel-{row['sigma_rel']:g}"
        m = run_calc(str(ref), data, str(out / "eval" / name), model=row["pipeline"],
                     num=args.num, steps=args.steps, seed=args.seed, resolution=resolution,
                     batch_size=args.batch_size, device=args.device, extractor=extractor,
                     max_train=args.max_train)
        scored.append({**row, **{k: m[k] for k in ("fid", "kid", "precision", "recall")},
                       "num": args.num, "ddim_steps": args.steps})
    (out / "posthoc_ema.json").write_text(json.dumps(scored, indent=2) + "\n")
    (out / "posthoc_ema.md").write_text(table(scored))
    plot(scored, out / "fid_vs_sigma_rel.png")
    print(table(scored))
    return scored


def _resolution(run_dir: Path) -> int:
    from .data.split import read_split

    vae = json.loads((run_dir / "config.json").read_text()).get("run", {}).get("vae")
    return int(read_split(vae, 128)["resolution"]) if vae else 128


def table(rows: list[dict]) -> str:
    """A markdown table of the scored rows."""
    lines = ["| weights | sigma_rel | FID | KID | precision | recall | profile error | N |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r.get("label") or f"post-hoc EMA (gamma {r['gamma']:.2f})"
        s = "" if r["sigma_rel"] is None else f"{r['sigma_rel']:g}"
        err = "" if r.get("fit_error") is None else f"{r['fit_error']:.1e}"
        lines.append(f"| {label} | {s} | {r['fid']:.2f} | {r['kid']:.4f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {err} | {r['num']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, size: tuple[int, int] = (640, 420)) -> None:
    """FID against sigma_rel (log axis), the LDM EMA as a horizontal line (PIL only)."""
    from PIL import Image, ImageDraw

    points = [(r["sigma_rel"], r["fid"]) for r in rows if r["sigma_rel"] is not None]
    baseline = [r["fid"] for r in rows if r["sigma_rel"] is None]
    if not points:
        return
    w, h = size
    left, right, top, bottom = 70, 20, 30, 50
    xs = [math.log(s) for s, _ in points]
    ys = [f for _, f in points] + baseline
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad = 0.08 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right),
                top + (y1 - y) / (y1 - y0) * (h - top - bottom))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for s, f in points:
        x, y = px(math.log(s), f)
        d.text((x - 12, h - bottom + 6), f"{s:g}", fill="black")
        d.text((x + 5, y - 14), f"{f:.1f}", fill="navy")
    for yv in (y0 + pad, y1 - pad):
        d.text((6, px(x0, yv)[1] - 6), f"{yv:.1f}", fill="black")
    d.line([px(math.log(s), f) for s, f in points], fill="navy", width=2)
    for s, f in points:
        x, y = px(math.log(s), f)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill="navy")
    for f in baseline:
        y = px(x0, f)[1]
        d.line([(left, y), (w - right, y)], fill="darkred", width=1)
        d.text((left + 6, y - 14), f"LDM EMA {f:.1f}", fill="darkred")
    d.text((w // 2 - 60, h - 22), "sigma_rel (log scale)", fill="black")
    d.text((6, 8), f"FID vs post-hoc EMA length (N={rows[0]['num']})", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
