"""Training and sampling on a CPU with settings meant for a GPU (ffhq_ldm/runtime.py).

Before: the README's `accelerate_config.yaml` (bf16) on a CPU trained in bf16 autocast without
a word, and `ffhq-ldm sample --dtype bf16` on a CPU ran many times slower with no warning.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from ffhq_ldm.cli_common import run_main
from ffhq_ldm.runtime import accelerator_on_cpu, cpu_dtype_warning, training_mixed_precision


def test_bf16_on_a_cpu_becomes_fp32_with_one_note(capsys):
    assert training_mixed_precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, on_cpu=True) == "no"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: no GPU: training in fp32")


@pytest.mark.parametrize("env,on_cpu", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, False),  # a GPU: the config decides
    ({"ACCELERATE_MIXED_PRECISION": "no"}, True),     # configs/accelerate/cpu.yaml
    ({}, True),                                       # plain `python training/...`
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, True),   # left to the trainers' own refusal
])
def test_other_settings_are_left_to_the_config(env, on_cpu, capsys):
    assert training_mixed_precision(env, on_cpu=on_cpu) is None
    assert capsys.readouterr().err == ""


def test_a_cpu_config_keeps_bf16_only_where_the_cpu_computes_it(capsys):
    env = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "True"}
    assert training_mixed_precision(env, on_cpu=True, native_bf16=True) is None
    assert capsys.readouterr().err == ""
    assert training_mixed_precision(env, on_cpu=True, native_bf16=False) == "no"
    assert capsys.readouterr().err.startswith("note: no GPU: training in fp32")
    # The GPU config on a CPU with native bf16 still trains in fp32 (the user did not ask for
    # bf16 on a CPU).
    assert training_mixed_precision({"ACCELERATE_MIXED_PRECISION": "bf16"}, on_cpu=True,
                                    native_bf16=True) == "no"


def test_only_the_first_process_says_it(capsys):
    env = {"ACCELERATE_MIXED_PRECISION": "bf16", "RANK": "1"}
    assert training_mixed_precision(env, on_cpu=True) == "no"
    assert capsys.readouterr().err == ""


def test_use_cpu_in_the_config_means_cpu():
    assert accelerator_on_cpu({"ACCELERATE_USE_CPU": "True"})


def test_sampling_dtype_warning():
    assert cpu_dtype_warning("cpu", "bf16").startswith("warning: --dtype bf16 on a CPU")
    assert cpu_dtype_warning("cpu", "fp16") is not None
    assert cpu_dtype_warning("cpu", "fp32") is None
    assert cpu_dtype_warning("cuda", "bf16") is None


@pytest.mark.skipif(not accelerator_on_cpu({}), reason="this machine has a GPU")
def test_vae_trainer_with_the_gpu_config_trains_in_fp32(faces32, tmp_path, monkeypatch, capsys):
    # What `accelerate launch --config_file accelerate_config.yaml` passes on: bf16, not CPU.
    # In-process, as the other trainer tests: without the fallback, accelerate either starts in
    # bf16 or refuses to change the process's state; both fail here.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    code = run_main(load_script("train_vae").main, [
        "--preset", "tiny", "--data", str(faces32), "--output-dir", str(tmp_path),
        "--log-with", "none", "--no-progress", "--max-steps", "1", "--eval-every", "1",
        "--checkpoint-every", "1", "--no-rfid"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "note: no GPU: training in fp32, not the accelerate config's bf16" in err
    run = json.loads((tmp_path / "config.json").read_text())["run"]
    assert run["mixed_precision"] == "no"
