"""Every ``--help`` a user can ask for: ``ffhq-ldm``, each of its subcommands, both trainers.

The subcommands are read from ``ffhq-ldm --help`` itself (and the parser cross-checked), so a
newly registered one is covered without editing this file. Each option's help must show its
default, and the options both trainers share must be spelled the same way in both.
"""

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

SHARED_TRAINER_OPTIONS = ("--preset", "--data", "--output-dir", "--max-steps", "--batch-size",
                          "--seed", "--resume")
# Fixed width, no colour: the help text is parsed below.
HELP_ENV = {"COLUMNS": "100", "NO_COLOR": "1", "PYTHON_COLORS": "0"}


# ---------------------------------------------------------------------------------------------
# reading argparse's help text

def sections(text: str) -> dict[str, list[str]]:
    """Help text split at its unindented ``heading:`` lines (the usage paragraph is dropped)."""
    out, current = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return out


def listed_subcommands(text: str) -> list[str]:
    """Names argparse lists under "positional arguments" for a subparsers action.

    argparse indents a subcommand's name by 4 spaces (its metavar line, ``COMMAND`` or
    ``{a,b}``, by 2); a plain positional argument is indented by 2 and is not listed here.
    """
    names = []
    for line in sections(text).get("positional arguments", []):
        match = re.match(r"^ {4}([A-Za-z][\w-]*)(\s|$)", line)
        if match:
            names.append(match.group(1))
    return names


def option_blocks(text: str) -> dict[str, str]:
    """``{first option string: its whole help entry}`` over every option section."""
    blocks, key = {}, None
    for name, lines in sections(text).items():
        if name == "positional arguments":
            continue
        for line in lines:
            if re.match(r"^  -", line):
                key = re.split(r"[ ,]", line.strip())[0]
                blocks[key] = line
            elif key is not None and line.startswith("   "):
                blocks[key] += " " + line.strip()
            else:
                key = None
    return blocks


def options_without_default(text: str) -> list[str]:
    return [opt for opt, block in option_blocks(text).items()
            if opt not in ("-h", "--help") and "default" not in block]


# ---------------------------------------------------------------------------------------------
# running --help

def help_in_process(argv: list[str]) -> str:
    from ffhq_ldm.cli import build_parser

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code in (0, None), f"ffhq-ldm {' '.join(argv)} --help failed"
    return stdout.getvalue()


def help_subprocess(cmd: list[str]) -> subprocess.Popen:
    env = dict(os.environ, **HELP_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen([*cmd, "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return out


def subparser_choices(parser: argparse.ArgumentParser) -> dict:
    """The parser's registered subcommands (argparse keeps them on its subparsers action)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(argv: list[str], parser: argparse.ArgumentParser, found: dict) -> None:
    """Call ``--help`` on ``argv`` and on every subcommand its help lists, depth first."""
    text = help_in_process(argv)
    found[" ".join(argv) or "(top level)"] = text
    listed = listed_subcommands(text)
    registered = subparser_choices(parser)
    assert sorted(listed) == sorted(registered), (
        f"'ffhq-ldm {' '.join(argv)} --help' lists {listed}, the parser has {sorted(registered)}")
    for name in listed:
        walk([*argv, name], registered[name], found)


@pytest.fixture(scope="module")
def cli_helps():
    from ffhq_ldm.cli import build_parser

    old = {k: os.environ.get(k) for k in HELP_ENV}
    os.environ.update(HELP_ENV)
    try:
        found = {}
        walk([], build_parser(), found)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return found


@pytest.fixture(scope="module")
def trainer_helps():
    procs = {name: help_subprocess([sys.executable, str(ROOT / "training" / f"{name}.py")])
             for name in ("train_vae", "train_unet")}
    return {name: finish(p) for name, p in procs.items()}


# ---------------------------------------------------------------------------------------------

def test_every_subcommand_has_help(cli_helps):
    top = listed_subcommands(cli_helps["(top level)"])
    # The commands the README documents; others may be added, none may disappear silently.
    assert {"synth", "sample", "evaluate"} <= set(top), top
    print("--help ran for: ffhq-ldm, " + ", ".join(k for k in cli_helps if k != "(top level)"))
    for argv, text in cli_helps.items():
        assert text.startswith("usage: ffhq-ldm"), argv


def test_every_cli_option_shows_its_default(cli_helps):
    missing = {argv: opts for argv, text in cli_helps.items()
               if (opts := options_without_default(text))}
    assert not missing, ("options whose --help shows no default (give them a help string; the "
                         f"parsers' ArgumentDefaultsHelpFormatter then adds it): {missing}")


def test_console_script_lists_the_same_subcommands(cli_helps):
    script = Path(sys.executable).with_name("ffhq-ldm")
    assert script.is_file(), f"no console script at {script}: pip install -e . first"
    text = finish(help_subprocess([str(script)]))
    assert listed_subcommands(text) == listed_subcommands(cli_helps["(top level)"])


def test_training_scripts_help(trainer_helps):
    for name, text in trainer_helps.items():
        assert text.startswith(f"usage: {name}.py"), name
        assert not options_without_default(text), (name, options_without_default(text))


def test_trainers_share_option_names(trainer_helps):
    options = {name: set(option_blocks(text)) for name, text in trainer_helps.items()}
    for name, found in options.items():
        missing = [opt for opt in SHARED_TRAINER_OPTIONS if opt not in found]
        assert not missing, f"{name}.py --help lacks {missing}"
    # The same spelling also takes the same kind of value: compare option string + metavar.
    def signature(block: str) -> str:
        return re.match(r"\s*(--[\w-]+(?: [A-Z][A-Z_]*)?)", block).group(1)

    signatures = {name: {opt: signature(option_blocks(text)[opt]) for opt in SHARED_TRAINER_OPTIONS}
                  for name, text in trainer_helps.items()}
    assert signatures["train_vae"] == signatures["train_unet"]
