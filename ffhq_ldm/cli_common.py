"""What the training scripts and the ``ffhq-ldm`` CLI share: user errors and their exit code,
the help formatter."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from pathlib import Path

from .config import ConfigError

# Set by ``ffhq-ldm train`` (train/launch.py): where each trainer process writes its exit
# code, which ``accelerate launch`` would turn into 1.
EXIT_DIR_ENV = "FACELDM_EXIT_DIR"
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped, rerun to continue (train.resilience)
_PR_SET_PDEATHSIG = 1


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


class StopSignal(BaseException):
    """SIGTERM outside the training steps (data scan, latent cache, evaluation, export)."""


def _raise_stop(signum, frame) -> None:
    raise StopSignal(signum)


def _stop_with_parent() -> None:
    """Under ``accelerate launch`` (which sets ACCELERATE_MIXED_PRECISION): SIGTERM when the
    launcher dies, so a trainer never trains on, orphaned, after its launcher was stopped."""
    if not sys.platform.startswith("linux") or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _write_exit_code(code: int) -> None:
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and Path(folder).is_dir():
        rank = os.environ.get("RANK", "0")
        tmp = Path(folder) / f".exit-{rank}.tmp"
        tmp.write_text(f"{code}\n")
        os.replace(tmp, Path(folder) / f"exit-{rank}")


def run_trainer(main, argv=None) -> int:
    """``run_main`` for the training scripts: a stop signal anywhere is an exit, not a crash.

    Inside the training loop ``train.resilience.GracefulStop`` turns SIGTERM/SIGINT into a
    checkpoint and exit 75. Outside it (scanning data, building the latent cache, evaluating,
    exporting; each of them resumable or atomic) SIGTERM ends the run with exit 75 and Ctrl-C
    with 130, each with a one-line message. The exit code is also written where ``ffhq-ldm
    train`` reads it (``EXIT_DIR_ENV``).
    """
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _stop_with_parent()
        code = main(argv) or 0
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except StopSignal:
        print(f"stopped by SIGTERM outside the training steps; what was saved is kept: rerun "
              f"the same command to continue (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        code = EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); what was saved is kept: rerun the same command to continue "
              "(exit code 130)", file=sys.stderr)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    _write_exit_code(code)
    return code
