"""Post-hoc EMA (Karras et al., EDM2, CVPR 2024): the tracked power-function profiles, the
least-squares reconstruction from their snapshots, exact resume, and ``ffhq-ldm ema``.

Every expected value here is computed independently of the module: the power-function EMA of
a known weight sequence straight from its weights (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1), in
float64, and sigma_rel(gamma) from the values EDM2 quotes for its two tracks.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from safetensors.torch import load_file

from ffhq_ldm.cli import main as cli_main
from ffhq_ldm.train import posthoc_ema
from ffhq_ldm.train.posthoc_ema import PostHocEMA, gamma_of, plan, reconstruct, sigma_rel_of
from ffhq_ldm.train.resilience import EXIT_PREEMPTED, TEST_SIGNAL_ENV


class Vector(torch.nn.Module):
    """A "model" whose one parameter is set to each weight of a synthetic trajectory."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def set(self, value: np.ndarray) -> None:
        with torch.no_grad():
            self.w.copy_(torch.from_numpy(value))


def exact_power_ema(thetas: np.ndarray, gamma: float) -> np.ndarray:
    """The power-function EMA after len(thetas) updates, from the closed-form weights."""
    t_end = len(thetas)
    tau = np.arange(1, t_end + 1, dtype=np.float64)
    # (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1), written with ratios so nothing overflows
    w = (tau / t_end) ** (gamma + 1) - ((tau - 1) / t_end) ** (gamma + 1)
    return w @ thetas


def random_walk(steps: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    drift = np.linspace(0, 3, dim)  # a trend, as training has, plus noise
    return np.cumsum(rng.standard_normal((steps, dim)) * 0.1 + drift / steps, axis=0) + 1.0


def test_sigma_rel_of_edm2s_two_tracks():
    # EDM2, section 3.1: gamma 16.97 and 6.94 are sigma_rel 0.05 and 0.10
    assert sigma_rel_of(16.97) == pytest.approx(0.05, abs=5e-5)
    assert sigma_rel_of(6.94) == pytest.approx(0.10, abs=5e-5)
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.01)


def test_profile_update_equals_the_closed_form_and_a_skipped_step_counts_for_nothing():
    rng = np.random.default_rng(1)
    thetas = rng.standard_normal((40, 5))
    model = Vector(5)
    profiles = PostHocEMA(model, sigma_rels=(0.05, 0.10, 0.25), every=1000)
    skip = {7, 8, 23}  # steps whose update the guard refused
    used = []
    for step, theta in enumerate(thetas):
        model.set(theta)
        ok = step not in skip
        profiles.update(model, enabled=torch.tensor(ok))
        if ok:
            used.append(theta)
        if len(used) in (1, 2, 3, 10, 37):
            for gamma, track in zip(profiles.gammas, profiles.tracks, strict=True):
                expected = exact_power_ema(np.array(used), gamma)
                np.testing.assert_allclose(track[0].double().numpy(), expected,
                                           rtol=1e-5, atol=1e-5)
    assert profiles.num_updates() == len(thetas) - len(skip)


class WrongExponent(PostHocEMA):
    """A planted bug: beta = (1 - 1/t)^gamma, one power short, while the snapshots say gamma."""

    def update(self, model, enabled=True):
        true = self.gammas
        self.gammas = tuple(g - 1 for g in true)
        try:
            super().update(model, enabled)
        finally:
            self.gammas = true


def _track(thetas: np.ndarray, out: Path, every: int, cls=PostHocEMA) -> Vector:
    model = Vector(thetas.shape[1])
    profiles = cls(model, every=every, dtype="float32")
    for step, theta in enumerate(thetas, start=1):
        model.set(theta)
        profiles.update(model)
        profiles.maybe_snapshot(step, out, final=step == len(thetas))
    return model


# 2000 updates, a snapshot every 100: 20 snapshots of each of the two tracked profiles.
WALK_STEPS, WALK_EVERY = 2000, 100


@pytest.mark.parametrize("sigma_rel", [0.03, 0.07, 0.15])
def test_reconstruction_matches_the_exact_power_ema_of_a_random_walk(tmp_path, sigma_rel):
    thetas = random_walk(WALK_STEPS, 64)
    _track(thetas, tmp_path, WALK_EVERY)
    recipe = plan(tmp_path, sigma_rel)
    got = reconstruct(recipe)["w"].double().numpy()
    exact = exact_power_ema(thetas, gamma_of(sigma_rel))
    # The nearest tracked profile: what one would use without the reconstruction.
    nearest = min((0.05, 0.10), key=lambda s: abs(math.log(s / sigma_rel)))
    baseline = np.linalg.norm(exact_power_ema(thetas, gamma_of(nearest)) - exact)
    error = np.linalg.norm(got - exact)
    # Measured at this spacing (20 snapshots a profile): relative profile error 2.6e-2, 2.5e-3,
    # 5.8e-3 and weight error 1.7%, 0.12%, 0.14% of the gap to the nearest tracked profile
    # for sigma_rel 0.03, 0.07, 0.15. The promise checked: within 5% of that gap, the error of
    # using the nearest tracked profile instead (a wrong exponent or a lost last snapshot
    # gives 30% and more, see the next test).
    assert recipe["fit_error"] < 0.03, recipe["fit_error"]
    assert error < 0.05 * baseline, (error, baseline)


def test_a_missing_last_snapshot_or_a_wrong_exponent_breaks_the_reconstruction(tmp_path):
    # The checks above must be able to fail: the same walk, with the last snapshot gone (the
    # reconstruction is then of an older EMA) or the profiles tracked with a wrong exponent.
    thetas = random_walk(WALK_STEPS, 64)
    exact = exact_power_ema(thetas, gamma_of(0.07))
    nearest = np.linalg.norm(exact_power_ema(thetas, gamma_of(0.05)) - exact)

    _track(thetas, tmp_path / "a", WALK_EVERY)
    (tmp_path / "a" / "posthoc_ema" / f"step-{WALK_STEPS:08d}.safetensors").unlink()
    got = reconstruct(plan(tmp_path / "a", 0.07))["w"].double().numpy()
    assert np.linalg.norm(got - exact) > 0.05 * nearest

    _track(thetas, tmp_path / "b", WALK_EVERY, cls=WrongExponent)
    got = reconstruct(plan(tmp_path / "b", 0.07))["w"].double().numpy()
    assert np.linalg.norm(got - exact) > 0.05 * nearest


def test_fp16_snapshots_add_a_small_error(tmp_path):
    thetas = random_walk(WALK_STEPS, 64)
    exact = exact_power_ema(thetas, gamma_of(0.07))
    model = Vector(64)
    profiles = PostHocEMA(model, every=WALK_EVERY, dtype="float16")
    for step, theta in enumerate(thetas, start=1):
        model.set(theta)
        profiles.update(model)
        profiles.maybe_snapshot(step, tmp_path, final=step == len(thetas))
    got = reconstruct(plan(tmp_path, 0.07))["w"].double().numpy()
    # fp16 keeps 11 significant bits (relative rounding 2^-11 = 4.9e-4); the combination's
    # coefficients sum to 1 but are of both signs, which could amplify it;
    # measured: 1.8e-4 (fp32 snapshots: 5.8e-5)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 5e-4


# ---------------------------------------------------------------------------------------------
# the trainer: exact resume after a real SIGTERM, and `ffhq-ldm ema` on the result

def unet_args(faces32, vae, out, cache) -> list:
    return ["--preset", "tiny", "--no-progress", "--log-with", "none", "--data", str(faces32),
            "--vae", str(vae), "--output-dir", str(out), "--latent-cache", str(cache),
            "--max-steps", "16", "--checkpoint-every", "8", "--preview-every", "16",
            "--posthoc-ema", "--posthoc-every", "4"]


def test_profiles_and_snapshots_resume_bit_identical_after_sigterm(faces32, tiny_vae, tmp_path,
                                                                   monkeypatch):
    train = load_script("train_unet")
    cache = tmp_path / "cache"
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert train.main(unet_args(faces32, tiny_vae, reference, cache)) == 0
    # a real SIGTERM to this process after step 6: a checkpoint there, snapshot 4 written
    monkeypatch.setenv(TEST_SIGNAL_ENV, "6")
    assert train.main(unet_args(faces32, tiny_vae, out, cache)) == EXIT_PREEMPTED
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    assert [s for _, s in posthoc_ema.list_snapshots(out)] == [4]
    assert train.main(unet_args(faces32, tiny_vae, out, cache)) == 0

    snaps = posthoc_ema.list_snapshots(reference)
    assert [s for _, s in snaps] == [4, 8, 12, 16]
    assert [s for _, s in posthoc_ema.list_snapshots(out)] == [4, 8, 12, 16]
    files = [Path("posthoc_ema") / p.name for p, _ in snaps]
    files.append(Path("checkpoints") / "step-00000016" / posthoc_ema.STATE_FILE)
    for name in files:
        a, b = load_file(str(reference / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # and the reconstruction of the finished run is a working pipeline folder
    exported = tmp_path / "ema0.08"
    assert cli_main(["ema", "--run", str(out), "--sigma-rel", "0.08", "--out",
                     str(exported)]) == 0
    assert "sigma_rel 0.08" in (exported / "README.md").read_text()
    assert (exported / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_ema_command_refuses_a_run_without_snapshots_in_one_line(tmp_path, capsys):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    assert cli_main(["ema", "--run", str(tmp_path), "--sigma-rel", "0.1", "--out",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--posthoc-ema" in err[0]
