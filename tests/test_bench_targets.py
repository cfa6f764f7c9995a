"""The bench's target verdicts against hand-written rows, its run order, and the partial results
it leaves behind when a later row fails or the run is killed."""

import argparse
import json
import math

import pytest
import torch

from ffhq_ldm import bench
from ffhq_ldm.bench_targets import NO_CUDA, TARGETS, judge, judge_all


def row(task, batch, compiled, ips=None, fast=True, **extra):
    r = {"task": task, "batch_size": batch, "compiled": compiled, "fast": fast,
         "variant": "x", **extra}
    if ips is not None:
        r["images_per_s"] = ips
    return r


def target(name_start):
    return next(t for t in TARGETS if t.name.startswith(name_start))


UNET = "UNet train step, batch 256"
MEMORY = "UNet batch 64 peak memory"
ENCODE = "latent cache builder"
SAMPLE = "sampling as"
VAE = "autoencoder step"


@pytest.mark.parametrize("name,rows,verdict,value", [
    (UNET, [row("train-unet", 256, True, 3100.0)], "pass", 3100.0),
    (UNET, [row("train-unet", 256, True, 2999.0)], "fail", 2999.0),
    (UNET, [row("train-unet", 256, True, 3000.0)], "pass", 3000.0),  # the bound itself holds
    (UNET, [row("train-unet", 256, True, math.nan)], "fail", None),
    # the rate at batch 64 or uncompiled does not stand in for the compiled batch-256 row
    (UNET, [row("train-unet", 64, True, 5000.0), row("train-unet", 256, False, 5000.0)],
     "not measured: no train-unet compiled, batch 256 row in this run", None),
    (MEMORY, [row("train-unet", 64, True, 900.0, peak_total_gib=23.9)], "pass", 23.9),
    (MEMORY, [row("train-unet", 64, True, 900.0, peak_total_gib=24.2)], "fail", 24.2),
    (ENCODE, [row("encode", 256, False, 5200.0)], "pass", 5200.0),
    (ENCODE, [row("encode", 256, False, 4999.0)], "fail", 4999.0),
    (SAMPLE, [row("sample", 256, True, 120.0)], "fail", 120.0),
    (SAMPLE, [row("sample", 256, True, 260.0)], "pass", 260.0),
    # 420 / 160 = 2.625 >= 2.5; 380 / 160 = 2.375 < 2.5
    (VAE, [row("train-vae", 32, False, 160.0, fast=False), row("train-vae", 32, True, 420.0)],
     "pass", 2.625),
    (VAE, [row("train-vae", 32, False, 160.0, fast=False), row("train-vae", 32, True, 380.0)],
     "fail", 2.375),
    # bf16 eager is not the compiled row
    (VAE, [row("train-vae", 32, False, 160.0, fast=False), row("train-vae", 32, False, 900.0)],
     "not measured: no train-vae compiled row in this run", None),
])
def test_a_target_passes_or_fails_by_its_bound(name, rows, verdict, value):
    line = judge(target(name), rows, cuda=True)
    assert line["verdict"] == verdict
    if value is None:
        assert line["value"] is None or math.isnan(line["value"])
    else:
        assert line["value"] == pytest.approx(value)


def test_every_target_is_n_a_without_cuda_whatever_the_numbers():
    rows = [row("train-unet", 256, True, 1e9), row("train-unet", 64, True, 1.0,
                                                  peak_total_gib=1.0),
            row("encode", 256, False, 1e9), row("sample", 256, True, 1e9),
            row("train-vae", 32, False, 1.0, fast=False), row("train-vae", 32, True, 1e9)]
    lines = judge_all(rows, cuda=False)
    assert [line["verdict"] for line in lines] == [NO_CUDA] * len(TARGETS)
    assert all(line["value"] is None for line in lines)


def test_a_row_that_failed_fails_its_target_and_a_skipped_one_is_not_measured():
    oom = row("train-unet", 64, True, error="OutOfMemoryError: CUDA out of memory")
    line = judge(target(MEMORY), [oom], cuda=True)
    assert line["verdict"] == "fail" and "OutOfMemoryError" in line["note"]
    cut = row("train-unet", 256, True, skipped="time budget: 6.1 > --max-minutes 6.0 min")
    line = judge(target(UNET), [cut], cuda=True)
    assert line["verdict"] == "not measured: time budget: 6.1 > --max-minutes 6.0 min"
    # the baseline of a ratio counts too: without it the ratio is not measured
    line = judge(target(VAE), [row("train-vae", 32, True, 400.0)], cuda=True)
    assert line["verdict"].startswith("not measured")


def _args(**over):
    values = dict(batch_size=[64, 256], vae_batch_size=32, no_compile=False,
                  only=list(bench.TASKS))
    values.update(over)
    return argparse.Namespace(**values)


def _as_result(job):
    return {"task": job.task, "batch_size": job.batch, "compiled": job.compiled,
            "fast": job.fast, "images_per_s": 1.0, "peak_total_gib": 1.0}


def test_on_cuda_the_rows_the_targets_read_come_first_and_are_all_planned(monkeypatch):
    from ffhq_ldm.train import stage1

    def build_with_switch(run, config, *, compile=False, **kwargs):
        raise AssertionError("plan only reads the signature")
    monkeypatch.setattr(stage1, "build", build_with_switch)
    jobs = bench.plan(_args(), torch.device("cuda"))
    first = [(j.task, j.fast, j.compiled, j.batch) for j in jobs[:6]]
    assert first == [("train-unet", True, True, 256), ("train-unet", True, True, 64),
                     ("encode", True, False, 256), ("sample", True, True, 256),
                     ("train-vae", False, False, 32), ("train-vae", True, True, 32)]
    assert [j.memory_cap for j in jobs] == [j == jobs[1] for j in jobs]
    one = bench.plan(_args(batch_size=[64]), torch.device("cuda"))
    assert one[0].memory_cap and one[0].profile and one[0].batch == 64
    assert jobs[0].profile
    # every target reads a planned row, before any row no target reads
    results = [_as_result(j) for j in jobs if j.task != "attention"]
    lines = judge_all(results, cuda=True)
    assert all(line["verdict"] == "pass" or line["verdict"] == "fail" for line in lines), lines
    # the uncompiled UNet rows at both batches and the baselines follow
    rest = {(j.task, j.fast, j.compiled, j.batch) for j in jobs[6:]}
    assert {("train-unet", True, False, 64), ("train-unet", True, False, 256),
            ("train-unet", False, False, 64), ("sample", False, False, 64)} <= rest


def test_without_stage1s_compile_switch_the_autoencoder_row_runs_uncompiled(monkeypatch):
    from ffhq_ldm.train import stage1

    def build_without_switch(run, config, *, device=None, autocast_dtype=None):
        raise AssertionError("plan only reads the signature")
    monkeypatch.setattr(stage1, "build", build_without_switch)
    jobs = bench.plan(_args(), torch.device("cuda"))
    assert not any(j.task == "train-vae" and j.compiled for j in jobs)
    assert sum(j.task == "train-vae" and j.fast for j in jobs) == 1
    cpu = bench.plan(_args(), torch.device("cpu"))
    assert not any(j.compiled or j.memory_cap for j in cpu)  # compile and the cap: CUDA only


TINY = ["--preset", "tiny", "--device", "cpu", "--only", "train-unet", "--batch-size", "2,4",
        "--steps", "1", "--warmup", "1"]


def test_partial_results_are_on_disk_after_each_row_when_a_later_row_is_killed(
        tmp_path, monkeypatch):
    real, calls = bench._measure_step, []

    def measure(b, job):
        calls.append(job)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a run killed in its second row
        return real(b, job)
    monkeypatch.setattr(bench, "_measure_step", measure)
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--json", str(out)]) == 130  # "interrupted"
    report = json.loads(out.read_text())
    assert len(report["results"]) == 1
    first = report["results"][0]
    assert first["task"] == "train-unet" and first["batch_size"] == 4
    assert first["images_per_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert f"{first['images_per_s']:.4g}" in md and "## Targets" in md
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind


def test_a_row_that_raises_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real, calls = bench._measure_step, []

    def measure(b, job):
        calls.append(job)
        if len(calls) == 1:
            raise RuntimeError("compile failed\nsecond line")
        return real(b, job)
    monkeypatch.setattr(bench, "_measure_step", measure)
    out = tmp_path / "bench.json"
    assert bench.main([*TINY, "--json", str(out)]) == 1
    results = json.loads(out.read_text())["results"]
    assert results[0]["error"] == "RuntimeError: compile failed"
    assert len(results) == 3 and all(r["images_per_s"] > 0 for r in results[1:])


def _bench(*argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", *argv])
    return bench.Bench(args, torch.device("cpu"))


@pytest.mark.parametrize("per_image,want", [
    (0.01, 2 / 0.01),  # each image and its mirror at 10 ms per image; the 1 s start-up drops out
    (0.0, 2 * 48 / 1.0),  # no difference between the builds: the whole build's rate instead
])
def test_the_encode_rate_is_the_difference_of_two_cache_builds(monkeypatch, per_image, want):
    from ffhq_ldm.train import stage2

    clock, sizes = [0.0], []

    def build_cache(run, codec, items, folder, resolution, image_key, report, batch_size):
        sizes.append(len(items))
        clock[0] += 1.0 + per_image * len(items)
    monkeypatch.setattr(stage2, "build_cache", build_cache)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    result = _bench("--steps", "4", "--warmup", "2").measure_encode(
        bench.Job("encode", True, False, 8))
    assert sizes == [16, 16, 48]  # warm-up, warmup shards, warmup + steps shards of 8
    assert result["images_per_s"] == pytest.approx(want)
    assert result["whole_build_images_per_s"] == pytest.approx(2 * 48 / (1.0 + per_image * 48))
