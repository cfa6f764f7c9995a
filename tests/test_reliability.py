"""Faults at the edges of a training run: invalid options, signals through the launcher,
damaged checkpoints, two trainers on one folder, another data set on resume, tampered caches
and exports. Each test plants the fault and checks the documented outcome (an exit code, a
one-line message, a fallback), not the code's own earlier output."""

import os

import pytest
from conftest import ROOT, load_script

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.train.resilience import TEST_SIGNAL_ENV

COMMON = ["--preset", "tiny", "--no-progress", "--log-with", "none"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != TEST_SIGNAL_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------------------------
# (11) invalid options: one line, exit 2, before any work (the output folder is never made)

BAD_OPTIONS = [
    ("train_vae", ["--checkpoint-every", "0"]), ("train_vae", ["--batch-size", "0"]),
    ("train_vae", ["--learning-rate", "-1"]), ("train_vae", ["--learning-rate", "nan"]),
    ("train_vae", ["--resolution", "0"]), ("train_vae", ["--resolution", "31"]),
    ("train_vae", ["--max-steps", "-5"]), ("train_vae", ["--eval-every", "0"]),
    ("train_unet", ["--preview-every", "0"]), ("train_unet", ["--num-train-timesteps", "0"]),
    ("train_unet", ["--dropout", "2"]), ("train_unet", ["--ema-decay", "-1"]),
    ("train_unet", ["--ema-decay", "1"]), ("train_unet", ["--max-steps", "-5"]),
    ("train_unet", ["--learning-rate", "inf"]), ("train_unet", ["--cache-batch-size", "0"]),
    ("train_unet", ["--beta-start", "0.5", "--beta-end", "0.1"]),
]


@pytest.mark.parametrize("script,option", BAD_OPTIONS, ids=lambda v: "_".join(v)
                         if isinstance(v, list) else v)
def test_an_invalid_option_is_one_line_exit_2_before_any_work(script, option, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--vae", str(tmp_path / "no_vae")] if script == "train_unet" else []
    argv = [*COMMON, "--data", str(tmp_path / "no_data"), "--output-dir", str(out), *extra,
            *option]
    assert run_main(load_script(script).main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert option[0] in err, err
    assert not out.exists()
