"""What the training scripts and the ``ffhq-ldm`` CLI share: user errors and their exit code,
the help formatter."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines end with "(default: X)", except where the default is None and the help says
    in its own words what happens without the option ("default 64 on CUDA, 16 on CPU")."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Bad input from the user: reported in one line, exit code 2."""


# User-error classes of modules that may or may not have been imported: (module, class name).
_USER_ERRORS = (("ffhq_ldm.data.images", "DataError"),
                ("ffhq_ldm.data.latents", "CacheMismatchError"),
                ("ffhq_ldm.losses.perceptual", "PerceptualWeightsError"),
                ("ffhq_ldm.models.vae", "VAELoadError"),
                ("pipelines.pipeline_face_ldm", "PipelineArgumentError"))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "your input is wrong", not "the program is broken".

    Only the modules already imported can have raised theirs, so none is imported here: a
    bad option is reported without loading torch.
    """
    found = [UsageError, ConfigError, FileNotFoundError]
    for module, name in _USER_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


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
