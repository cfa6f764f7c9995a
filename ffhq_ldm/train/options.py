"""The command-line options both trainers share. Imports neither torch nor any other heavy
package, so ``--help`` and bad options are answered at once."""

from __future__ import annotations

import argparse

from ..cli_common import DefaultsHelpFormatter
from ..config import add_config_arguments, preset_names


def training_parser(description: str, config_cls) -> argparse.ArgumentParser:
    """The options both trainers share, named the same way, plus every config field."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--preset", default="ffhq128-f4", metavar="NAME",
                        help=f"configuration preset: {', '.join(preset_names())}")
    parser.add_argument("--data", required=True,
                        help="image folder (recursive; png/jpg/webp), or hf:NAME[:SPLIT], or "
                             "hf:imagefolder:PATH for a HuggingFace datasets dataset")
    parser.add_argument("--output-dir", required=True, help="where the run writes everything")
    parser.add_argument("--resume", default="auto",
                        help="'auto': continue from the latest checkpoint in --output-dir if there "
                             "is one; 'none': start fresh; or a checkpoint folder")
    parser.add_argument("--log-with", default="tensorboard",
                        help="accelerate tracker(s): tensorboard, wandb, ... or 'none'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser, config_cls)
    return parser


# Checks that need no heavy import, so that a wrong path is reported at once (the loaders check
# again, in full, once torch is there).

def require_data(data: str) -> None:
    """``--data``: an existing folder (a ``hf:`` dataset is checked when it is opened)."""
    from pathlib import Path

    from ..cli_common import UsageError

    if str(data).startswith("hf:"):
        return
    path = Path(data)
    if not path.exists():
        raise UsageError(f"data folder {path} does not exist")
    if not path.is_dir():
        raise UsageError(f"data path {path} is not a folder")


def require_export(folder: str, marker: str, what: str, written_by: str) -> None:
    """An exported folder: ``marker`` (config.json, model_index.json) must be in it. A folder
    that a killed export left as ``FOLDER.old`` is put back first."""
    from pathlib import Path

    from ..cli_common import UsageError
    from ..io import recover_dir

    path = Path(folder)
    recover_dir(path)
    if not (path / marker).is_file():
        raise UsageError(f"{folder} is not an exported {what} (no {marker}); pass the folder "
                         f"written by {written_by}")


def require_vae(folder: str) -> None:
    require_export(folder, "config.json", "autoencoder", "training/train_vae.py (OUTPUT/vae)")


def require_pipeline(folder: str) -> None:
    require_export(folder, "model_index.json", "pipeline folder",
                   "training/train_unet.py (OUTPUT/pipeline)")


def require_positive(args, *names: str) -> None:
    """Integer options that must be >= 1, named as on the command line."""
    from ..cli_common import UsageError

    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, not {value}")


# Post-hoc EMA (EDM2): the trainer's options; the tracking is train/posthoc_ema.py.
POSTHOC_SIGMA_RELS = (0.05, 0.10)  # EDM2's two tracked profiles
POSTHOC_EVERY = 20_000  # steps between snapshots; see docs/training.md "Post-hoc EMA"
POSTHOC_DTYPES = ("float16", "float32")  # storage of the snapshots


def float_list(text: str) -> list[float]:
    """argparse type: "0.05,0.1" -> [0.05, 0.1]."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") \
            from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def add_posthoc_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's ``--posthoc-*`` options."""
    group = parser.add_argument_group("post-hoc EMA (EDM2; see docs/training.md)")
    group.add_argument("--posthoc-ema", action="store_true",
                       help="also track power-function EMA profiles and save their snapshots "
                            "(OUTPUT/posthoc_ema/), for `ffhq-ldm ema` after training")
    group.add_argument("--posthoc-sigma-rels", type=float_list,
                       default=",".join(map(str, POSTHOC_SIGMA_RELS)),
                       help="relative standard deviations of the tracked profiles")
    group.add_argument("--posthoc-every", type=int, default=POSTHOC_EVERY,
                       help="steps between snapshots (the last step always gets one)")
    group.add_argument("--posthoc-dtype", choices=POSTHOC_DTYPES, default="float16",
                       help="storage type of the snapshots (the tracking itself is fp32)")
