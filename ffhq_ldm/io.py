"""Durable files: nothing a reader (or a resumed run) sees is ever half written.

Atomic JSON writes, fsync of files and folders, and replacing a whole folder with two renames
that a crashed process can always undo (``recover_dir``). Checkpoints, exports, logs and the
latent cache all write through these.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush one file, or one directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path``, then every directory's entries (deepest first, the root
    last): what a rename into place needs first, or a power cut can leave empty files behind."""
    items = sorted(path.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts)))
    for item in [*items, path]:
        fsync_path(item)


def recover_dir(final: Path) -> bool:
    """Undo the one state a killed ``replace_dir`` can leave: ``final`` moved aside to
    ``final.old`` and the new one not yet in place. Puts ``final.old`` back; True if it did."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``, replacing any previous ``final``.

    Two renames: the old ``final`` aside to ``final.old``, then ``tmp`` in. A process killed
    between them leaves ``final.old`` alone; ``recover_dir`` (run here, by the trainers when
    they start and by the loaders) puts it back. ``tmp`` is flushed to disk first, so a power
    cut cannot leave a renamed folder of empty files.
    """
    recover_dir(final)
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, payload) -> None:
    """Write JSON to a temporary name, then rename: a reader (or a resume) never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def read_json_or(path: Path, default):
    """JSON from ``path``, or ``default`` when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint a run resumes from), so the
    log reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)



def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line per log event: the machine-readable twin of the TensorBoard scalars."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
