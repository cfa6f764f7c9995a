"""Faults at the edges of a training run: invalid options, signals through the launcher,
damaged checkpoints, two trainers on one folder, another data set on resume, tampered caches
and exports. Each test plants the fault and checks the documented outcome (an exit code, a
one-line message, a fallback), not the code's own earlier output."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_resilience as resilience_tests
import torch
from conftest import ROOT, load_script
from test_resilience import UNET_EVERY, UNET_STEPS, assert_unet_runs_equal, checkpoint, unet_args

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.train import checkpoints
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


@pytest.mark.slow
def test_the_launcher_passes_a_bad_input_exit_code_on_unchanged(tmp_path):
    cmd = launcher("unet", *COMMON, "--data", tmp_path / "none", "--vae", tmp_path / "none",
                   "--output-dir", tmp_path / "out")
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "CalledProcessError" not in done.stderr
    assert "error: " in done.stderr


# A stand-in for accelerate's simple_launcher (no torch: fast): it starts the trainer, ignores
# signals' meaning, and turns any failure into exit code 1, as accelerate launch does.
FAKE_ACCELERATE = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
child.wait()
sys.exit(1 if child.returncode else 0)
"""
# A trainer under run_trainer that waits for a stop signal, reporting when it is ready.
FAKE_TRAINER = """
import sys, time
from pathlib import Path
from ffhq_ldm.cli_common import run_trainer
def main(argv):
    Path(sys.argv[1]).write_text("ready")
    time.sleep(120)
    return 0
sys.exit(run_trainer(main, []))
"""


def test_the_launcher_forwards_sigterm_to_the_trainer_and_returns_its_exit_code(tmp_path):
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", FAKE_ACCELERATE,
               FAKE_TRAINER.replace("sys.argv[1]", repr(str(ready)))]
    script = ("import sys\nfrom ffhq_ldm.train import launch\n"
              f"launch.accelerate_command = lambda *a: {command!r}\n"
              "sys.exit(launch.launch(['unet']))\n")
    top = subprocess.Popen([sys.executable, "-c", script], env=_env(), cwd=ROOT,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert top.poll() is None and time.monotonic() < deadline, top.communicate()[1]
            time.sleep(0.02)
        os.kill(top.pid, signal.SIGTERM)  # the top process only
        _, err = top.communicate(timeout=60)
    finally:
        if top.poll() is None:
            os.killpg(top.pid, signal.SIGKILL)
    assert top.returncode == EXIT_PREEMPTED, err  # not the stand-in's 1, not 143
    assert "stopped by SIGTERM outside the training steps" in err  # the trainer's own message
    assert "before training began" not in err  # not the launcher's guess


def test_the_launcher_returns_the_trainers_bad_input_code_not_accelerates_1(tmp_path):
    trainer = ("import sys\nfrom ffhq_ldm.cli_common import UsageError, run_trainer\n"
               "def main(argv):\n    raise UsageError('no such data')\n"
               "sys.exit(run_trainer(main, []))\n")
    script = ("import sys\nfrom ffhq_ldm.train import launch\n"
              f"launch.accelerate_command = lambda *a: "
              f"{[sys.executable, '-c', FAKE_ACCELERATE, trainer]!r}\n"
              "sys.exit(launch.launch(['vae']))\n")
    done = subprocess.run([sys.executable, "-c", script], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "error: no such data"


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
    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.vae import build_vae
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


# ---------------------------------------------------------------------------------------------
# (3, 9) checksums: a damaged latest checkpoint is passed over for the one before it

# an uninterrupted 16-step UNet run, test_resilience's module fixture (tiny_vae: conftest)
unet_reference = resilience_tests.unet_reference


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 64 for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _rerun(faces32, tiny_vae, out, cache, capsys, *more) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_main(load_script("train_unet").main,
                    unet_args(faces32, tiny_vae, out, cache, *more))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("damaged", ["unet.safetensors", "ema.safetensors",
                                     "optimizer-unet.safetensors", "rng-0.safetensors"])
def test_a_damaged_file_in_the_latest_checkpoint_falls_back_to_the_previous_one(
        damaged, unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    _flip_bytes(checkpoint(out, UNET_STEPS) / damaged)
    code, stdout, err = _rerun(faces32, tiny_vae, out, cache, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and damaged in warnings[0] and "damaged" in warnings[0], err
    assert f"resumed from {checkpoint(out, UNET_EVERY)} at step {UNET_EVERY}" in stdout
    assert_unet_runs_equal(reference, out)  # retrained from step 8: the same weights


def test_a_nan_tensor_with_a_matching_checksum_is_refused_too(unet_reference, faces32, tiny_vae,
                                                             tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    reference, cache = unet_reference
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint(reference, UNET_STEPS), damaged)
    with safe_open(str(damaged / "ema.safetensors"), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(damaged / "ema.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(damaged / "ema.safetensors"), metadata=metadata)
    state = json.loads((damaged / "trainer_state.json").read_text())
    state["files"]["ema.safetensors"] = checkpoints.file_digest(damaged / "ema.safetensors")
    (damaged / "trainer_state.json").write_text(json.dumps(state))
    code, _, err = _rerun(faces32, tiny_vae, tmp_path / "run", cache, capsys, "--resume", damaged)
    assert code == 2
    assert err.strip().count("\n") == 0 and "non-finite" in err and name in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("images_seen"), "'images_seen' is missing"),
    (lambda s: s.update(step="16"), "'step' is '16', not an int"),
    (lambda s: s.update(step=20), "says step 20 inside step-00000016"),
])
def test_an_edited_trainer_state_is_a_one_line_error_or_a_fallback(
        edit, message, unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    state_file = checkpoint(out, UNET_STEPS) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    # named by path: refused in one line
    code, _, err = _rerun(faces32, tiny_vae, tmp_path / "other", cache, capsys, "--resume",
                          checkpoint(out, UNET_STEPS))
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err and "Traceback" not in err
    # found by auto-resume: passed over with a warning
    code, stdout, err = _rerun(faces32, tiny_vae, out, cache, capsys)
    assert code == 0 and message in err, err
    assert f"at step {UNET_EVERY}" in stdout


# ---------------------------------------------------------------------------------------------
# (4, 8) one run per folder; a crash before the first checkpoint leaves no repeated log lines

@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_log_and_lock_do_not_linger(
        unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    endless = ["--max-steps", "1000000", "--checkpoint-every", "1000000", "--preview-every",
               "1000000"]
    cmd = [sys.executable, str(ROOT / "training" / "train_unet.py"),
           *unet_args(faces32, tiny_vae, out, cache), *endless]
    first = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        while not ((out / "log.jsonl").is_file() and
                   (out / "log.jsonl").read_text().count("\n") >= 2):
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        code, _, err = _rerun(faces32, tiny_vae, out, cache, capsys)
        assert code == 2 and err.strip().count("\n") == 0, err
        assert f"pid {first.pid} on host " in err and "in use by another training run" in err
        assert first.poll() is None  # the first run trains on
    finally:
        first.kill()  # kill -9 before its first checkpoint
        first.communicate()
    assert not (out / "checkpoints").exists() or not checkpoints.list_checkpoints(out)
    code, _, err = _rerun(faces32, tiny_vae, out, cache, capsys)  # no stale lock
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, UNET_STEPS + 1))
    assert_unet_runs_equal(reference, out)


def test_a_folder_locked_by_another_process_is_refused_until_that_process_dies(
        faces32, tiny_vae, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ffhq_ldm.train.lock import lock_folder; "
         f"lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(600)"],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _rerun(faces32, tiny_vae, out, tmp_path / "cache", capsys)
        assert code == 2 and err.strip().count("\n") == 0, err
        assert f"pid {holder.pid} on host " in err
        assert not (out / "latent_cache").exists() and not (tmp_path / "cache").exists()
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    from ffhq_ldm.train.lock import lock_folder

    assert lock_folder(out) is not None


def test_log_lines_of_a_run_killed_before_its_first_checkpoint_are_dropped(
        unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    out.mkdir()
    # what a run killed at step 3, before its first checkpoint, leaves: 3 lines, no checkpoint
    (out / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n"
                                           for s in (1, 2, 3)))
    code, _, err = _rerun(faces32, tiny_vae, out, cache, capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, UNET_STEPS + 1))


# ---------------------------------------------------------------------------------------------
# (5, 6) data identity: by content, not by path

def test_the_same_images_through_a_symlink_or_a_relative_path_are_accepted(
        unet_reference, faces32, tiny_vae, tmp_path, capsys, monkeypatch):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    link = tmp_path / "faces_link"
    link.symlink_to(faces32, target_is_directory=True)
    code, stdout, err = _rerun(link, tiny_vae, out, cache, capsys)
    assert code == 0 and f"at step {UNET_STEPS}" in stdout, err
    monkeypatch.chdir(faces32.parent)
    code, stdout, err = _rerun(Path(faces32.name), tiny_vae, out, cache, capsys)
    assert code == 0 and f"at step {UNET_STEPS}" in stdout, err


def test_other_images_of_the_same_count_are_refused_by_the_cache_and_the_checkpoint(
        unet_reference, faces32, tiny_vae, tmp_path, capsys):
    from ffhq_ldm.data.synthetic import generate_faces

    reference, cache = unet_reference
    other = tmp_path / "other_faces"
    generate_faces(other, len(list(faces32.glob("*.png"))), size=32, seed=1, progress=False)
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    code, _, err = _rerun(other, tiny_vae, out, cache, capsys)  # the reference's cache
    assert code == 2 and "a different set of images" in err, err
    code, _, err = _rerun(other, tiny_vae, out, tmp_path / "new_cache", capsys)
    assert code == 2 and "cannot resume" in err and "data_fingerprint" in err, err


# ---------------------------------------------------------------------------------------------
# (9, 10) a damaged or tampered latent cache: one line, exit 2, before any training

def _tamper_shard(change):
    def edit(cache: Path) -> None:
        from safetensors.torch import load_file, save_file

        shard = cache / "shard-00000.safetensors"
        save_file(change(load_file(str(shard))), str(shard))
    return edit


def _outside_shard(cache: Path) -> None:
    outside = cache.parent / "elsewhere.safetensors"
    shutil.copy(cache / "shard-00000.safetensors", outside)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0] = str(outside)
    (cache / "manifest.json").write_text(json.dumps(manifest))


CACHE_FAULTS = {
    "truncated-shard": (lambda c: (c / "shard-00000.safetensors").write_bytes(
        (c / "shard-00000.safetensors").read_bytes()[:200]), "unreadable"),
    "manifest-not-json": (lambda c: (c / "manifest.json").write_text("{oops"),
                          "not valid JSON"),
    "8x8-latents": (_tamper_shard(lambda s: {k: v[..., :8, :8].contiguous()
                                             for k, v in s.items()}), "latents of shape"),
    "int64-latents": (_tamper_shard(lambda s: {k: v.long() for k, v in s.items()}), "dtype"),
    "std-60000": (_tamper_shard(lambda s: {"mean": s["mean"],
                                           "std": torch.full_like(s["std"], 60000.0)}),
                  "a std outside"),
    "nan-mean": (_tamper_shard(lambda s: {"mean": s["mean"] * float("nan"), "std": s["std"]}),
                 "non-finite"),
    "shard-outside-the-cache": (_outside_shard, "not a shard file"),
}


@pytest.mark.parametrize("fault", sorted(CACHE_FAULTS))
def test_a_damaged_or_tampered_latent_cache_is_a_one_line_error(
        fault, unet_reference, faces32, tiny_vae, tmp_path, capsys):
    _, reference_cache = unet_reference
    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    tamper, message = CACHE_FAULTS[fault]
    tamper(cache)
    code, _, err = _rerun(faces32, tiny_vae, tmp_path / "run", cache, capsys)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# (9, 10) an edited export: one line, exit 2, no NaN images

def _edit_json(relative: str, change):
    def edit(pipeline: Path) -> None:
        path = pipeline / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return edit


EXPORT_FAULTS = {
    "unknown-unet-class": (_edit_json("model_index.json",
                                      lambda d: d.update(unet=["diffusers", "NotAModel"])),
                           "NotAModel"),
    "zero-timesteps": (_edit_json("scheduler/scheduler_config.json",
                                  lambda d: d.update(num_train_timesteps=0, trained_betas=None)),
                       "num_train_timesteps"),
    "two-trained-betas": (_edit_json("scheduler/scheduler_config.json",
                                     lambda d: d.update(trained_betas=[0.1, 0.2])),
                          "trained_betas"),
    "a-beta-of-1.5": (_edit_json("scheduler/scheduler_config.json",
                                 lambda d: d["trained_betas"].__setitem__(3, 1.5)),
                      "trained_betas"),
    "zero-scaling-factor": (_edit_json("vae/config.json", lambda d: d.update(scaling_factor=0)),
                            "scaling_factor"),
    "huge-sample-size": (_edit_json("vae/config.json",
                                    lambda d: d.update(sample_size=10**9)), "sample_size"),
    "model-index-not-json": (lambda p: (p / "model_index.json").write_text("{"),
                             "not valid JSON"),
}


@pytest.mark.parametrize("fault", sorted(EXPORT_FAULTS))
def test_an_edited_export_is_a_one_line_error_not_nan_images(fault, unet_reference, tmp_path,
                                                            capsys):
    from ffhq_ldm.cli import main as cli_main

    reference, _ = unet_reference
    pipeline = tmp_path / "pipeline"
    shutil.copytree(reference / "pipeline", pipeline)
    tamper, message = EXPORT_FAULTS[fault]
    tamper(pipeline)
    capsys.readouterr()
    code = cli_main(["sample", "--model", str(pipeline), "--num", "1", "--steps", "2",
                     "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert message in err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_resuming_under_another_mixed_precision_is_allowed_with_a_note(
        unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    state_file = checkpoint(out, UNET_STEPS) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["mixed_precision"] == "no"
    state["mixed_precision"] = "bf16"  # as if saved by a bf16 run
    state_file.write_text(json.dumps(state))
    code, _, err = _rerun(faces32, tiny_vae, out, cache, capsys)
    assert code == 0, err
    assert "mixed precision bf16, this run uses no" in err and "not bit-identically" in err


# ---------------------------------------------------------------------------------------------
# (7) a stop outside the training steps: a message and 75 (SIGTERM) or 130 (Ctrl-C)

@pytest.mark.parametrize("where", ["build_cache", "finish"])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, EXIT_PREEMPTED), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_stop_outside_the_training_steps_exits_with_a_message(
        where, sig, code, unet_reference, faces32, tiny_vae, tmp_path, capsys, monkeypatch):
    from ffhq_ldm.cli_common import run_trainer
    from ffhq_ldm.train import stage2

    cache = tmp_path / "cache"
    owner = stage2 if where == "build_cache" else stage2.Exporter
    real = getattr(owner, where)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)  # a real signal, through the real handlers
        time.sleep(5)  # the handler interrupts this
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, where, signalled)
    # Ctrl-C as a terminal delivers it: a job started in the background (`cmd &` without job
    # control, as some CI runners start the suite) inherits SIGINT ignored, and Python then
    # never installs its KeyboardInterrupt handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    capsys.readouterr()
    try:
        got = run_trainer(load_script("train_unet").main,
                          unet_args(faces32, tiny_vae, tmp_path / "run", cache))
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert got == code, err
    assert "rerun the same command" in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers put back
