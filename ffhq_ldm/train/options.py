"""The command-line options both trainers share. Imports neither torch nor any other heavy
package, so ``--help`` and bad options are answered at once."""

from __future__ import annotations

import argparse

from ..config import add_config_arguments, preset_names


def training_parser(description: str, config_cls) -> argparse.ArgumentParser:
    """The options both trainers share, named the same way, plus every config field."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
