"""``ffhq-ldm train vae|unet``: ``accelerate launch`` that passes stop signals and exit codes on.

``accelerate launch`` alone loses both (accelerate/commands/launch.py, ``simple_launcher``): it
waits on the trainer with no signal handler, so a SIGTERM sent to its PID ends the launcher
(exit 143) while the trainer, re-parented, trains on; as a container's PID 1 it has no handler
and the kernel drops the signal; and any non-zero exit of the trainer becomes 1 with a
``CalledProcessError`` traceback, so "preempted, rerun" (75) and "bad input" (2) look alike.

This launcher runs the same ``accelerate launch`` in a process group of its own and:

- forwards SIGTERM, SIGINT and SIGHUP (as SIGTERM) to the trainer processes (accelerate's
  children), which save a checkpoint and exit 75 (``EXIT_PREEMPTED``);
- adopts the trainers if accelerate dies first (``PR_SET_CHILD_SUBREAPER``) and waits for them,
  reaping every child, so it also serves as PID 1;
- returns the trainer's own exit code, which the trainer writes into ``$FACELDM_EXIT_DIR``
  (``cli_common.run_trainer``), unchanged.

Imports neither torch nor accelerate: it only starts them.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..cli_common import EXIT_DIR_ENV, EXIT_PREEMPTED, UsageError

STAGES = ("vae", "unet")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36
USAGE = ("usage: ffhq-ldm train [ACCELERATE LAUNCH OPTIONS] vae|unet [TRAINER OPTIONS]; "
         "e.g. ffhq-ldm train vae --data DIR --output-dir runs/vae (see "
         "training/train_vae.py --help)")


def training_script(stage: str) -> Path:
    return Path(__file__).resolve().parents[2] / "training" / f"train_{stage}.py"


def split_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(accelerate's options, the stage, the trainer's options)."""
    for i, token in enumerate(argv):
        if token in STAGES:
            return argv[:i], token, argv[i + 1:]
    raise UsageError(USAGE)


def accelerate_command(accel_args: list[str], stage: str, trainer_args: list[str]) -> list[str]:
    given = any(a == "--config_file" or a.startswith("--config_file=") for a in accel_args)
    if not given and Path("accelerate_config.yaml").is_file():
        accel_args = ["--config_file", "accelerate_config.yaml", *accel_args]
    if "--quiet" not in accel_args and "-q" not in accel_args:
        accel_args = ["--quiet", *accel_args]  # no CalledProcessError traceback: the code is ours
    return [sys.executable, "-m", "accelerate.commands.launch", *accel_args,
            str(training_script(stage)), *trainer_args]


def _become_subreaper() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def trainer_pids(launcher: int) -> list[int]:
    """The trainer processes of the accelerate launcher ``launcher``: the members of its
    process group whose parent is the launcher (or, once it died, this process, which adopted
    them). Their own children (data-loader or compile workers) are left to them."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    parents = {launcher, os.getpid()}
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == launcher:
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == launcher and \
                int(fields[1]) in parents:
            found.append(int(entry.name))
    return found


class Forwarder:
    """Signal handlers that pass a stop on to the trainers in the child's process group."""

    def __init__(self, child: subprocess.Popen):
        self.child, self.received = child, None

    def __call__(self, signum, frame) -> None:
        self.received = signum
        targets = trainer_pids(self.child.pid)
        if not targets:  # the trainer has not started yet: stop the launcher instead
            targets = [self.child.pid]
        # SIGHUP (a closed terminal) asks for the same as SIGTERM: save and exit 75
        sent = signal.SIGTERM if signum == signal.SIGHUP else signum
        for pid in targets:
            try:
                os.kill(pid, sent)
            except ProcessLookupError:
                pass


def exit_code_of(exit_dir: Path) -> int | None:
    """The trainer's exit code: rank 0's, else the highest any rank wrote."""
    codes = {}
    for path in exit_dir.glob("exit-*"):
        try:
            codes[path.name[5:]] = int(path.read_text().strip())
        except ValueError:
            continue
    if not codes:
        return None
    return codes.get("0", max(codes.values()))


def _wait_all(child: subprocess.Popen, subreaper: bool) -> int:
    """Wait for accelerate, then (as subreaper) for every adopted trainer; accelerate's code."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1 if subreaper else child.pid, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code
            if not subreaper:
                break
    return code if code is not None else 1


def launch(argv: list[str]) -> int:
    accel_args, stage, trainer_args = split_argv(argv)
    if not training_script(stage).is_file():
        raise UsageError(f"{training_script(stage)} not found: ffhq-ldm train runs from a "
                         "source checkout of FaceLDM")
    subreaper = _become_subreaper()
    exit_dir = Path(tempfile.mkdtemp(prefix="faceldm-exit-"))
    env = dict(os.environ, **{EXIT_DIR_ENV: str(exit_dir)})
    try:
        child = subprocess.Popen(accelerate_command(accel_args, stage, trainer_args), env=env,
                                 start_new_session=True)
        forward = Forwarder(child)
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            launcher_code = _wait_all(child, subreaper)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = exit_code_of(exit_dir)
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)
    if code is not None:
        return code
    if forward.received is not None:
        # stopped before a trainer could start (or answer): nothing was trained, nothing lost
        print(f"stopped by {signal.Signals(forward.received).name} before training began; "
              f"rerun the same command (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    return launcher_code if launcher_code >= 0 else 128 - launcher_code
