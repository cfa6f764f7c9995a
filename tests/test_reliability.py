"""Faults at the edges of a training run: invalid options, signals through the launcher,
damaged checkpoints, two trainers on one folder, another data set on resume, tampered caches
and exports. Each test plants the fault and checks the documented outcome (an exit code, a
one-line message, a fallback), not the code's own earlier output."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.train.resilience import EXIT_PREEMPTED, TEST_SIGNAL_ENV

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


# ---------------------------------------------------------------------------------------------
# (1, 2, 7) signals and exit codes through the launcher: `ffhq-ldm train ...`

def launcher(*args) -> list:
    return [sys.executable, "-m", "ffhq_ldm.cli", "train", "--config_file",
            str(ROOT / "configs" / "accelerate" / "cpu.yaml"), *map(str, args)]


def test_the_launcher_passes_a_bad_input_exit_code_on_unchanged(tmp_path):
    cmd = launcher("unet", *COMMON, "--data", tmp_path / "none", "--vae", tmp_path / "none",
                   "--output-dir", tmp_path / "out")
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr
    assert "error: " in done.stderr


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _wait_for_training(process, out: Path) -> None:
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().strip()):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("as_pid_1", [False, True], ids=["process-group", "pid-1"])
def test_sigterm_to_the_launcher_saves_exits_75_and_resumes_bit_identically(
        as_pid_1, faces32, tmp_path):
    if as_pid_1 and (os.geteuid() != 0 or not shutil.which("unshare")):
        pytest.skip("a PID namespace needs root and unshare")
    from test_resilience import UNET_STEPS, assert_unet_runs_equal, unet_args

    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.vae import build_vae
    from ffhq_ldm.train import checkpoints
    from ffhq_ldm.train.export import export_vae

    torch.manual_seed(0)
    vae = tmp_path / "vae"
    export_vae(build_vae(get_preset("tiny", "vae")), vae, 1.0,
               {"holdout": 8, "split_seed": 0, "resolution": 32})
    reference, out, cache = tmp_path / "reference", tmp_path / "run", tmp_path / "cache"
    assert load_script("train_unet").main(unet_args(faces32, vae, reference, cache)) == 0
    endless = ["--max-steps", "1000000", "--checkpoint-every", "1000000", "--preview-every",
               "1000000"]
    cmd = launcher("unet", *unet_args(faces32, vae, out, cache), *endless)
    if as_pid_1:  # the launcher as the init process of a new PID namespace (a container)
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    process = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_training(process, out)
        top = _children(process.pid)[0] if as_pid_1 else process.pid
        os.kill(top, signal.SIGTERM)  # the top process only, not its group
        _, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) < UNET_STEPS, saved
    assert load_script("train_unet").main(unet_args(faces32, vae, out, cache)) == 0
    assert_unet_runs_equal(reference, out)
