"""Nothing lost, nothing crashes: exact resume, safe checkpoints, preemption, non-finite losses,
hostile checkpoint files.

The resume tests compare an interrupted-and-resumed run with an uninterrupted one BITWISE
(torch.equal) on CPU, one torch thread everywhere. The interrupted runs are real processes
stopped by real signals: the UNet's by a SIGTERM the test sends once the run's log shows it
training, the VAE's by the trainer's test hook ($_FACELDM_TEST_SIGNAL_AT_STEP), which makes the
process signal itself after a chosen step, mid-epoch.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script
from safetensors import safe_open
from safetensors.torch import load_file

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.train import checkpoints, ema, resilience
from ffhq_ldm.train.resilience import EXIT_PREEMPTED, TEST_SIGNAL_ENV

COMMON = ["--preset", "tiny", "--no-progress", "--log-with", "none"]
UNET_STEPS, UNET_EVERY = 16, 8
# --holdout 28 leaves 20 training images: x 2 flips / batch 8 = 5 steps an epoch. The run is
# stopped at step 3 (mid-epoch) and resumed across the epoch boundary.
VAE_STEPS, VAE_STOP = 8, 3


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != TEST_SIGNAL_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _script(name: str) -> list:
    return [sys.executable, str(ROOT / "training" / f"{name}.py")]


def assert_same_tensors(file_a: Path, file_b: Path) -> None:
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys() and a, f"{file_a.name}: different (or no) tensors"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{file_a.name} differs in {different[:5]}"


def checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def steps_logged(out: Path) -> list:
    text = (out / "log.jsonl").read_text()
    complete = text[:text.rfind("\n") + 1]  # the file may be mid-write while a run goes on
    return [json.loads(line)["step"] for line in complete.splitlines()]


# ---------------------------------------------------------------------------------------------
# fixtures: an untrained tiny autoencoder and one uninterrupted UNet run

def unet_args(faces32, tiny_vae, out, cache, *more) -> list:
    return [*COMMON, "--data", str(faces32), "--vae", str(tiny_vae), "--output-dir", str(out),
            "--latent-cache", str(cache), "--log-every", "1", "--max-steps", str(UNET_STEPS),
            "--checkpoint-every", str(UNET_EVERY), "--preview-every", str(UNET_STEPS),
            *map(str, more)]


@pytest.fixture(scope="module")
def unet_reference(faces32, tiny_vae, tmp_path_factory):
    """(output folder, shared latent cache) of an uninterrupted 16-step UNet run."""
    root = tmp_path_factory.mktemp("unet_reference")
    out, cache = root / "out", root / "cache"
    assert load_script("train_unet").main(unet_args(faces32, tiny_vae, out, cache)) == 0
    return out, cache


def assert_unet_runs_equal(a: Path, b: Path) -> None:
    assert_same_tensors(a / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors",
                        b / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    for name in ("ema", "unet", "optimizer-unet"):
        assert_same_tensors(checkpoint(a, UNET_STEPS) / f"{name}.safetensors",
                            checkpoint(b, UNET_STEPS) / f"{name}.safetensors")


# ---------------------------------------------------------------------------------------------
# exact resume after a real signal

def test_unet_sigterm_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(
        unet_reference, faces32, tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    # Started as a practically endless run, so that it cannot finish before the signal; the
    # rerun finishes it at the reference's length (max_steps may change on resume).
    cmd = _script("train_unet") + unet_args(faces32, tiny_vae, out, cache) + \
        ["--max-steps", "1000000", "--checkpoint-every", "1000000", "--preview-every", "1000000"]
    process = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the first logged step; a run that exits before it fails here.
        while not ((out / "log.jsonl").is_file() and steps_logged(out)):
            assert process.poll() is None, process.communicate()[1][-3000:]
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by SIGTERM" in err and "Rerun the same command" in err
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1, saved
    stopped_at = int(saved[0].name.split("-")[1])
    assert 1 <= stopped_at < UNET_STEPS, f"the signal came too late (step {stopped_at})"
    assert steps_logged(out)[-1] == stopped_at

    capsys.readouterr()
    assert load_script("train_unet").main(unet_args(faces32, tiny_vae, out, cache)) == 0
    assert f"resumed from {saved[0]} at step {stopped_at}" in capsys.readouterr().out
    assert_unet_runs_equal(reference, out)
    assert steps_logged(out) == list(range(1, UNET_STEPS + 1))  # one line per step, no repeats
    state = json.loads((checkpoint(out, UNET_STEPS) / "trainer_state.json").read_text())
    reference_state = json.loads((checkpoint(reference, UNET_STEPS) / "trainer_state.json")
                                 .read_text())
    for key in ("step", "images_seen", "schedulers", "log_window", "nonfinite"):
        assert state[key] == reference_state[key], key


def test_vae_sigterm_mid_epoch_then_rerun_is_bitwise_equal_to_an_uninterrupted_run(
        faces32, tmp_path):
    def args(out):
        return [*COMMON, "--data", str(faces32), "--output-dir", str(out), "--log-every", "1",
                "--holdout", "28", "--max-steps", str(VAE_STEPS), "--eval-every", str(VAE_STEPS),
                "--checkpoint-every", "4", "--scale-images", "16", "--no-rfid"]

    reference, out = tmp_path / "reference", tmp_path / "run"
    assert load_script("train_vae").main(args(reference)) == 0
    # The process sends itself a real SIGTERM after step 3 (of a 5-step epoch).
    result = subprocess.run(_script("train_vae") + args(out),
                            env=_env(**{TEST_SIGNAL_ENV: str(VAE_STOP)}), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert f"stopped by SIGTERM at step {VAE_STOP}" in result.stderr
    assert checkpoints.list_checkpoints(out) == [checkpoint(out, VAE_STOP)]
    assert not (out / "vae").exists()

    assert load_script("train_vae").main(args(out)) == 0
    assert_same_tensors(reference / "vae" / "diffusion_pytorch_model.safetensors",
                        out / "vae" / "diffusion_pytorch_model.safetensors")
    for name in ("vae", "discriminator", "optimizer-vae"):
        assert_same_tensors(checkpoint(reference, VAE_STEPS) / f"{name}.safetensors",
                            checkpoint(out, VAE_STEPS) / f"{name}.safetensors")
    assert steps_logged(out) == list(range(1, VAE_STEPS + 1))
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == [0, VAE_STEPS]


# ---------------------------------------------------------------------------------------------
# safe checkpoints

def test_a_save_killed_midway_leaves_the_previous_checkpoint_and_the_rerun_resumes_from_it(
        unet_reference, faces32, tiny_vae, tmp_path, monkeypatch, capsys):
    reference, cache = unet_reference
    out = tmp_path / "run"
    real_fsync_tree = checkpoints.fsync_tree

    def die_in_the_second_save(path):
        # every file of the step-16 checkpoint is written; the process dies before the rename
        if path.name == f".tmp-step-{UNET_STEPS:08d}":
            raise RuntimeError("killed in the middle of a save")
        real_fsync_tree(path)

    monkeypatch.setattr(checkpoints, "fsync_tree", die_in_the_second_save)
    with pytest.raises(RuntimeError, match="killed in the middle"):
        load_script("train_unet").main(unet_args(faces32, tiny_vae, out, cache))
    monkeypatch.undo()

    leftover = out / "checkpoints" / f".tmp-step-{UNET_STEPS:08d}"
    assert leftover.is_dir()  # the half-written save is there, but never listed
    assert checkpoints.list_checkpoints(out) == [checkpoint(out, UNET_EVERY)]
    assert checkpoints.read_trainer_state(checkpoint(out, UNET_EVERY))["step"] == UNET_EVERY

    capsys.readouterr()
    assert load_script("train_unet").main(unet_args(faces32, tiny_vae, out, cache)) == 0
    assert f"at step {UNET_EVERY}" in capsys.readouterr().out
    assert not leftover.exists()
    assert_unet_runs_equal(reference, out)


def test_starting_fresh_replaces_the_previous_runs_checkpoints_at_its_first_save(
        unet_reference, faces32, tiny_vae, tmp_path):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    old = checkpoints.list_checkpoints(out)
    assert [p.name for p in old] == ["step-00000008", "step-00000016"]
    # a fresh 4-step run in the same folder: auto-resume must never pick the old step 16 later
    args = unet_args(faces32, tiny_vae, out, cache, "--resume", "none", "--max-steps", "4",
                     "--checkpoint-every", "2")
    assert load_script("train_unet").main(args) == 0
    assert [p.name for p in checkpoints.list_checkpoints(out)] == ["step-00000002",
                                                                   "step-00000004"]
    assert checkpoints.read_trainer_state(checkpoint(out, 4))["images_seen"] == 4 * 8


def test_resuming_an_older_checkpoint_replaces_the_abandoned_newer_one(
        unet_reference, faces32, tiny_vae, tmp_path):
    reference, cache = unet_reference
    out = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    args = unet_args(faces32, tiny_vae, out, cache, "--resume", checkpoint(out, UNET_EVERY),
                     "--max-steps", "10", "--checkpoint-every", "10")
    assert load_script("train_unet").main(args) == 0
    assert checkpoints.list_checkpoints(out) == [checkpoint(out, 8), checkpoint(out, 10)]


def test_stale_temporaries_are_ignored_then_cleaned(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000004", ".tmp-step-00000008", ".del-step-00000002-77"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
    (root / "step-00000006").mkdir()  # no trainer_state.json: never complete
    assert checkpoints.list_checkpoints(tmp_path) == [root / "step-00000004"]
    cleaned = checkpoints.clean_stale(tmp_path)
    assert sorted(p.name for p in cleaned) == [".del-step-00000002-77", ".tmp-step-00000008"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]


# ---------------------------------------------------------------------------------------------
# non-finite losses

class _PoisonedLoss:
    """Wraps DiffusionLoss: the loss of optimizer step n (counted from 1) is NaN if bad(n)."""

    def __init__(self, bad, real):
        self.bad, self.real, self.calls = bad, real, 0

    def to(self, device):
        self.real = self.real.to(device)
        return self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss, logs = self.real(*args, **kwargs)
        return (loss * float("nan") if self.bad(self.calls) else loss), logs


def _poisoned_unet_script(bad, monkeypatch):
    from ffhq_ldm.train import stage2

    real_cls = stage2.DiffusionLoss
    monkeypatch.setattr(stage2, "DiffusionLoss",
                        lambda *a, **k: _PoisonedLoss(bad, real_cls(*a, **k)))
    return load_script("train_unet")


def test_a_nan_batch_skips_its_update_and_the_run_finishes(unet_reference, faces32, tiny_vae,
                                                           tmp_path, capsys, monkeypatch):
    _, cache = unet_reference
    out = tmp_path / "run"
    script = _poisoned_unet_script(lambda n: n == 3, monkeypatch)
    assert script.main(unet_args(faces32, tiny_vae, out, cache)) == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["nonfinite_skipped"] for line in lines] == [0, 0] + [1] * (UNET_STEPS - 2)
    assert lines[2]["loss"] is None  # no finite step in that log window: null, not NaN
    assert "update(s) skipped, loss not finite" in capsys.readouterr().err
    final = checkpoint(out, UNET_STEPS)
    # AdamW and the EMA took UNET_STEPS - 1 steps: the NaN step did not count
    steps = {k: v for k, v in load_file(str(final / "optimizer-unet.safetensors")).items()
             if k.endswith("/step")}
    assert steps and all(v.item() == UNET_STEPS - 1 for v in steps.values())
    with safe_open(str(final / "ema.safetensors"), "pt") as f:
        assert f.metadata()["num_updates"] == str(UNET_STEPS - 1)
    assert all(torch.isfinite(t).all() for t in load_file(str(final / "unet.safetensors")).values())
    assert json.loads((final / "trainer_state.json").read_text())["nonfinite"]["total"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop_with_exit_2_keeping_the_good_checkpoint(
        unet_reference, faces32, tiny_vae, tmp_path, capsys, monkeypatch):
    _, cache = unet_reference
    out = tmp_path / "run"
    script = _poisoned_unet_script(lambda n: n >= 5, monkeypatch)
    code = run_main(script.main, unet_args(faces32, tiny_vae, out, cache, "--checkpoint-every",
                                           "2", "--max-nonfinite", "3"))
    assert code == 2
    err = capsys.readouterr().err
    assert "stopped at step 7: the loss was not finite for 3 steps in a row" in err
    saved = checkpoints.list_checkpoints(out)
    assert saved[-1] == checkpoint(out, 6) and f"last good checkpoint is {saved[-1]}" in err
    # steps 5 and 6 were skipped: the step-6 checkpoint holds the step-4 weights, bit for bit
    for name in ("unet", "ema", "optimizer-unet"):
        assert_same_tensors(checkpoint(out, 4) / f"{name}.safetensors",
                            checkpoint(out, 6) / f"{name}.safetensors")
    weights = load_file(str(checkpoint(out, 6) / "unet.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_vae_skips_a_nan_step_too(faces32, tmp_path, capsys):
    from ffhq_ldm.losses.autoencoder import AutoencoderLoss

    module = load_script("train_vae")
    real = AutoencoderLoss.nll  # the step's reconstruction term (its loss and its gradient)
    calls = []

    def nll(self, *args, **kwargs):
        value, logs = real(self, *args, **kwargs)
        calls.append(1)
        return (value * float("nan"), logs) if len(calls) == 2 else (value, logs)

    AutoencoderLoss.nll = nll
    try:
        code = module.main([*COMMON, "--data", str(faces32), "--output-dir", str(tmp_path),
                            "--log-every", "1", "--max-steps", "4", "--eval-every", "4",
                            "--checkpoint-every", "4", "--no-rfid"])
    finally:
        AutoencoderLoss.nll = real
    assert code == 0
    assert "update(s) skipped" in capsys.readouterr().err
    state = load_file(str(checkpoint(tmp_path, 4) / "optimizer-vae.safetensors"))
    steps = [v.item() for k, v in state.items() if k.endswith("/step")]
    assert set(steps) == {3.0}


def test_guard_on_the_host_path_with_a_plain_optimizer():
    """The fallback (no fused optimizer, or a GradScaler): the flag is read every step."""
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    messages = []
    guard = resilience.NonFiniteGuard(2, "cpu", deferred=False, write=messages.append)
    before = model.weight.detach().clone()
    loss = model(torch.ones(1, 3)).sum() * float("inf")
    loss.backward()
    bad = guard.flag(loss)
    assert guard.step(optimizer, bad) is False
    guard.record(bad, 1)
    assert torch.equal(model.weight, before) and model.weight.grad is None  # zeroed
    assert not guard.poll(1) and guard.total == 1 and "step 1" in messages[0]
    guard.record(guard.flag(torch.tensor(float("nan"))), 2)
    assert guard.poll(2)  # two in a row: stop


def test_gated_ema_update_matches_the_plain_one_and_a_closed_gate_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    plain, gated = ema.EMA(model, 0.9), ema.EMA(model, 0.9)
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        plain.update(model)
        gated.update(model, enabled=torch.tensor(True))
    for a, b in zip(plain.shadow, gated.shadow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    frozen = [s.clone() for s in gated.shadow]
    with torch.no_grad():
        model.weight.add_(1.0)
    gated.update(model, enabled=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(frozen, gated.shadow, strict=True))
    assert gated.num_updates == plain.num_updates == 4


# ---------------------------------------------------------------------------------------------
# preemption: the second signal

def test_a_second_sigint_aborts_at_once():
    from accelerate import PartialState

    stop = resilience.GracefulStop(PartialState())
    with stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.should_stop(1) and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is not stop._handle


# ---------------------------------------------------------------------------------------------
# resuming with other settings, hostile checkpoint files

def test_resuming_with_another_architecture_is_a_one_line_error(unet_reference, faces32, tiny_vae,
                                                                tmp_path, capsys):
    reference, cache = unet_reference
    args = unet_args(faces32, tiny_vae, tmp_path / "run", cache, "--block-out-channels", "32,64",
                     "--resume", checkpoint(reference, UNET_EVERY))
    assert run_main(load_script("train_unet").main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "cannot resume from" in err and "--block-out-channels 16,32 (this command: 32,64)" in err


def test_a_vae_checkpoint_is_not_a_unet_checkpoint(tmp_path):
    state = {"format": checkpoints.CHECKPOINT_FORMAT, "trainer": "vae", "config": {}}
    from ffhq_ldm.config import UNetConfig, get_preset

    with pytest.raises(checkpoints.CheckpointError, match="checkpoint of 'vae', not of 'unet'"):
        checkpoints.check_resumable(state, tmp_path, "unet", UNetConfig,
                                    get_preset("tiny", "unet"), {})


@pytest.mark.parametrize("config, message", [
    ({"block_out_channels": [16, 32], "fancy_option": 1}, "unknown UNetConfig field"),
    ({"block_out_channels": "16,32", "norm_num_groups": "four"}, "invalid config"),
])
def test_a_checkpoint_config_with_unknown_or_invalid_fields_is_a_clear_error(tmp_path, config,
                                                                             message):
    from ffhq_ldm.config import UNetConfig, get_preset

    state = {"format": checkpoints.CHECKPOINT_FORMAT, "trainer": "unet", "config": config}
    with pytest.raises(checkpoints.CheckpointError, match=message):
        checkpoints.check_resumable(state, tmp_path, "unet", UNetConfig,
                                    get_preset("tiny", "unet"), {})


def test_a_failed_rng_restore_is_an_error_not_a_log_line(unet_reference, faces32, tiny_vae,
                                                          tmp_path, capsys):
    reference, cache = unet_reference
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint(reference, UNET_EVERY), damaged)
    rng = damaged / "rng-0.safetensors"
    rng.write_bytes(rng.read_bytes()[:100])  # accelerate would log "Could not load random states"
    args = unet_args(faces32, tiny_vae, tmp_path / "run", cache, "--resume", damaged)
    assert run_main(load_script("train_unet").main, args) == 2
    err = capsys.readouterr().err
    assert f"cannot restore {damaged}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing saved


def test_a_damaged_trainer_state_is_a_clear_error(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{not json")
    with pytest.raises(checkpoints.CheckpointError, match="not valid JSON"):
        checkpoints.read_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text('{"step": 3}')  # accelerate-era, or foreign
    with pytest.raises(checkpoints.CheckpointError, match="another version"):
        checkpoints.read_trainer_state(tmp_path)


class _CreatesAFile:
    """A pickle that, when unpickled, creates a file: stands for any code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(unet_reference, faces32,
                                                                    tiny_vae, tmp_path, capsys):
    reference, cache = unet_reference
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil-checkpoint"
    shutil.copytree(checkpoint(reference, UNET_STEPS), evil)
    # the files accelerate's load_state would unpickle (custom_checkpoint_0.pkl with
    # weights_only=False), next to our safetensors
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"):
        (evil / name).write_bytes(pickle.dumps(_CreatesAFile(marker)))
    args = unet_args(faces32, tiny_vae, tmp_path / "run", cache, "--resume", evil)
    assert run_main(load_script("train_unet").main, args) == 2
    err = capsys.readouterr().err
    assert "pickle files" in err and "refused" in err and "custom_checkpoint_0.pkl" in err
    assert not marker.exists()


def test_a_crafted_pickle_as_model_weights_is_refused_and_never_runs(unet_reference, tmp_path):
    from ffhq_ldm.models.vae import VAELoadError, load_vae
    from ffhq_ldm.sampling import load_pipeline

    reference, _ = unet_reference
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_CreatesAFile(marker))
    vae = tmp_path / "vae"
    shutil.copytree(reference / "pipeline" / "vae", vae)
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    (vae / "diffusion_pytorch_model.bin").write_bytes(payload)
    with pytest.raises(VAELoadError, match="pickled weights"):
        load_vae(vae)
    pipe = tmp_path / "pipeline"
    shutil.copytree(reference / "pipeline", pipe)
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(payload)
    from ffhq_ldm.cli_common import UsageError

    with pytest.raises(UsageError, match="pickled weights are refused"):
        load_pipeline(str(pipe))
    assert not marker.exists()


def test_channels_last_unet_resumes_exactly(unet_reference, faces32, tiny_vae, tmp_path,
                                            monkeypatch):
    """The CUDA layout, forced on this CPU: NHWC weights and their AdamW moments survive a
    checkpoint (saved contiguous, their layout restored on load; fused AdamW walks flat memory,
    so a moment left in the other layout would pair with the wrong weight)."""
    _, cache = unet_reference
    monkeypatch.setenv("FFHQ_LDM_CHANNELS_LAST", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train = load_script("train_unet").main
    assert train(unet_args(faces32, tiny_vae, straight, cache)) == 0
    config = json.loads((straight / "config.json").read_text())
    assert config["run"]["speed"]["channels_last"] is True
    assert train(unet_args(faces32, tiny_vae, resumed, cache, "--max-steps", UNET_EVERY)) == 0
    assert train(unet_args(faces32, tiny_vae, resumed, cache)) == 0
    assert_unet_runs_equal(straight, resumed)


def test_channels_last_autoencoder_trains_exports_and_resumes_exactly(faces32, tmp_path,
                                                                      monkeypatch):
    """The same for the autoencoder, its discriminator and their two fused Adams."""
    monkeypatch.setenv("FFHQ_LDM_CHANNELS_LAST", "1")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [*COMMON, "--data", str(faces32), "--holdout", "28", "--max-steps", "4",
            "--checkpoint-every", "2", "--eval-every", "4", "--disc-start", "1", "--no-rfid"]
    train = load_script("train_vae").main
    assert train([*args, "--output-dir", str(straight)]) == 0
    assert json.loads((straight / "config.json").read_text())["run"]["speed"]["channels_last"]
    assert train([*args, "--output-dir", str(resumed), "--max-steps", "2"]) == 0
    assert train([*args, "--output-dir", str(resumed)]) == 0
    for name in ("vae", "discriminator", "optimizer-vae", "optimizer-discriminator"):
        assert_same_tensors(checkpoint(straight, 4) / f"{name}.safetensors",
                            checkpoint(resumed, 4) / f"{name}.safetensors")
    assert (resumed / "vae" / "config.json").is_file()


def test_an_export_killed_between_its_two_renames_is_put_back(tmp_path, monkeypatch):
    """replace_dir moves the old folder aside, then the new one in: a kill in between leaves
    only vae.old. The loaders and the trainers' start-up put it back; the next export works."""
    from ffhq_ldm import io as durable
    from ffhq_ldm.config import get_preset
    from ffhq_ldm.models.vae import build_vae, load_vae
    from ffhq_ldm.train import export

    split = {"holdout": 8, "split_seed": 0, "resolution": 32}
    torch.manual_seed(0)
    first = build_vae(get_preset("tiny", "vae"))
    out = tmp_path / "run" / "vae"
    export.export_vae(first, out, 1.0, split)

    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        export.export_vae(build_vae(get_preset("tiny", "vae")), out, 2.0, split)
    monkeypatch.setattr(durable.os, "replace", real_replace)
    assert not out.exists() and (tmp_path / "run" / "vae.old").is_dir()

    loaded = load_vae(out)  # puts vae.old back and loads it: the first export, complete
    assert out.is_dir() and not (tmp_path / "run" / "vae.old").exists()
    assert loaded.config.scaling_factor == 1.0
    for (name, a), (_, b) in zip(first.state_dict().items(), loaded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    export.export_vae(build_vae(get_preset("tiny", "vae")), out, 2.0, split)
    assert load_vae(out).config.scaling_factor == 2.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["vae"]

    # the same state for a pipeline folder, put back by a trainer's start-up cleaning
    (tmp_path / "run" / "pipeline.old").mkdir()
    (tmp_path / "run" / "pipeline.old" / "model_index.json").write_text("{}")
    checkpoints.clean_stale(tmp_path / "run")
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_a_vae_stopped_then_rerun_to_the_step_it_stopped_at_still_evaluates_and_exports(
        faces32, tmp_path, monkeypatch):
    """Stopped by a signal at step 2, then rerun with --max-steps 2 (what a time-boxed run
    does): no step is left to train, but the final evaluation and the export are still due."""
    out = tmp_path / "run"
    args = [*COMMON, "--data", str(faces32), "--output-dir", str(out), "--holdout", "28",
            "--eval-every", "100", "--checkpoint-every", "100", "--scale-images", "16",
            "--no-rfid"]
    monkeypatch.setenv(TEST_SIGNAL_ENV, "2")
    assert load_script("train_vae").main([*args, "--max-steps", "6"]) == EXIT_PREEMPTED
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == [0]
    assert load_script("train_vae").main([*args, "--max-steps", "2"]) == 0
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == [0, 2]
    assert (out / "vae" / "config.json").is_file()
    assert (out / "reconstructions" / "step-00000002.png").is_file()
