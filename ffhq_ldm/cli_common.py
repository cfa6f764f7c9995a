"""What the training scripts and the ``ffhq-ldm`` CLI share: options, errors, exit codes."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, add_config_arguments, preset_names


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with "(default: X)", except where the default is None and the help says
    in its own words what happens without the option ("default 64 on CUDA, 16 on CPU")."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Bad input from the user: reported in one line, exit code 2."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "your input is wrong", not "the program is broken"."""
    from pipelines.pipeline_face_ldm import PipelineArgumentError

    from .data.images import DataError
    from .data.latents import CacheMismatchError
    from .losses.perceptual import PerceptualWeightsError
    from .models.vae import VAELoadError

    return (UsageError, ConfigError, DataError, CacheMismatchError, PerceptualWeightsError,
            VAELoadError, FileNotFoundError, PipelineArgumentError)


def run_main(main, argv=None) -> int:
    """Run ``main(argv)``; a user error becomes ``error: ...`` on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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
