"""One run owns its output folder: a second trainer on the same ``--output-dir`` is refused.

``fcntl.flock`` on ``OUTPUT/.lock``, held for the life of the process. The kernel releases it
when the process ends in any way (kill -9, a crash, a lost node), so there is never a stale
lock to delete by hand. The file holds the owner's PID and host for the refusal message; its
content is informative only, the lock itself is the kernel's. On a network file system flock
is only as good as the server's lock support (NFSv4: emulated with POSIX locks, it works).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..cli_common import UsageError

LOCK_NAME = ".lock"
# Locks this process holds, by folder: a process may start several runs in one folder one
# after another (tests do), and keeps the lock until it ends.
_HELD: dict[Path, object] = {}


class FolderInUseError(UsageError):
    """Another process holds the folder's lock: one line, exit code 2."""


def lock_folder(folder: Path):
    """Take ``folder``'s lock (held until this process ends) or raise ``FolderInUseError``."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock (documented)
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:
        return _HELD[key]
    handle = open(folder / LOCK_NAME, "a+")  # noqa: SIM115  (held open on purpose)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            owner = json.loads(handle.read() or "{}")
        except json.JSONDecodeError:
            owner = {}
        handle.close()
        raise FolderInUseError(
            f"{folder} is in use by another training run (pid {owner.get('pid', '?')} on "
            f"host {owner.get('host', '?')}); wait for it to end, stop it, or choose another "
            "--output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")
    handle.flush()
    _HELD[key] = handle
    return handle
