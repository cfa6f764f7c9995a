"""`--help` and bad input are answered before any heavy package loads.

Each command runs in a fresh interpreter through a small wrapper that reports, after the
command has finished, which of torch, diffusers, accelerate, PIL and numpy it imported. The
wall time is not asserted (the machine may be busy); what is imported decides it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "accelerate", "PIL", "numpy")

WRAPPER = f"""
import runpy, sys
argv = sys.argv[1:]
try:
    if argv[0].endswith(".py"):
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    else:
        from ffhq_ldm.cli import main
        code = main(argv)
except SystemExit as exc:
    code = exc.code
print("HEAVY:" + ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code if isinstance(code, int) else 1)
"""


def run(*argv: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    heavy = proc.stderr.rsplit("HEAVY:", 1)[-1].strip()
    return proc.returncode, proc.stdout + proc.stderr, heavy


def subcommands() -> list[list[str]]:
    """Every `ffhq-ldm` subcommand (and sub-subcommand), read from the parser itself."""
    import argparse

    from ffhq_ldm.cli import build_parser

    def walk(parser, prefix):
        out = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    out.append(prefix + [name])
                    out.extend(walk(child, prefix + [name]))
        return out

    return walk(build_parser(), [])


def test_every_subcommand_is_listed():
    names = {" ".join(c) for c in subcommands()}
    assert {"sample", "synth", "reconstruct", "cache-latents", "bench", "scan-data",
            "evaluate", "evaluate calc", "evaluate ref"} <= names


@pytest.mark.parametrize("argv", [[], *subcommands(), ["training/train_vae.py"],
                                  ["training/train_unet.py"]],
                         ids=lambda argv: " ".join(argv) or "ffhq-ldm")
def test_help_imports_nothing_heavy(argv):
    code, output, heavy = run(*argv, "--help")
    assert code == 0, output
    assert "usage:" in output
    assert heavy == "", f"--help imported {heavy}"


@pytest.mark.parametrize("argv, message", [
    (["sample", "--model", "/no/such/folder", "--num", "1", "--out", "x"],
     "is not an exported pipeline folder"),
    (["sample", "--model", ".", "--num", "0", "--out", "x"], "--num must be >= 1"),
    (["reconstruct", "--vae", "/no/such/vae", "--data", ".", "--out", "x"],
     "is not an exported autoencoder"),
    (["cache-latents", "--vae", "/no/such/vae", "--data", ".", "--latent-cache", "x"],
     "is not an exported autoencoder"),
    (["training/train_vae.py", "--data", "/no/such/data", "--output-dir", "x"],
     "does not exist"),
    (["training/train_vae.py", "--preset", "nope", "--data", ".", "--output-dir", "x"],
     "unknown preset"),
    (["training/train_unet.py", "--data", ".", "--vae", "/no/such/vae", "--output-dir", "x"],
     "is not an exported autoencoder"),
    (["training/train_unet.py", "--data", ".", "--vae", "x", "--output-dir", "x",
      "--log-every", "0"], "--log-every must be >= 1"),
], ids=lambda value: value if isinstance(value, str) else " ".join(value[:2]))
def test_bad_input_is_reported_before_anything_heavy_loads(argv, message):
    code, output, heavy = run(*argv)
    assert code == 2, output
    assert f"error: {message}" in output or message in output
    assert "Traceback" not in output
    assert heavy == "", f"{argv} imported {heavy} before saying what was wrong"
