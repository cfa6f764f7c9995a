"""The sampler study: its reference, its error, its summary, against formulas written here."""

from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline

from ffhq_ldm import sampler_study as study
from ffhq_ldm.sampling import initial_noise, make_scheduler

SHORT_SCHEDULE = 50  # training timesteps of the short schedule the fast tests use
# The sweep always runs DDIM-50, which "leading" spacing with steps_offset 1 cannot do on a
# schedule of 50 timesteps (it would ask for timestep 50): its tests use 100.
SWEEP_SCHEDULE = 100


def _pipe(timesteps: int = SHORT_SCHEDULE):
    """The tiny pipeline, its DDIM schedule shortened to ``timesteps`` (the same betas' shape)."""
    pipe = build_tiny_pipeline()
    config = dict(pipe.scheduler.config)
    config.update(num_train_timesteps=timesteps, trained_betas=None,
                  beta_schedule="scaled_linear")
    pipe.scheduler = type(pipe.scheduler).from_config(config)
    return pipe


def _noise(pipe, num: int = 3):
    c = pipe.unet.config
    return initial_noise(0, range(num), (c.in_channels, c.sample_size, c.sample_size))[0]


def _ddim_by_formula(pipe, noise, timesteps: list[int], final_alpha: float):
    """Deterministic DDIM (Song et al. 2021, eq. 12 with sigma = 0), written out here:
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
    Returns (final state, data prediction of the last step)."""
    betas = np.linspace(pipe.scheduler.config.beta_start ** 0.5,
                        pipe.scheduler.config.beta_end ** 0.5,
                        pipe.scheduler.config.num_train_timesteps, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    x = noise.double()
    x0 = None
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            eps = pipe.unet(x.float(), torch.tensor(t)).sample.double()
            a_t = alphas[t]
            a_prev = alphas[timesteps[k + 1]] if k + 1 < len(timesteps) else final_alpha
            x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x, x0


def test_rmse_and_psnr_against_their_formulas():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    expected = np.sqrt(np.mean((a - b) ** 2))
    assert study.latent_rmse(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == \
        pytest.approx(expected, rel=1e-6)
    assert study.psnr_from_rmse(0.1) == pytest.approx(20.0)
    assert study.psnr_from_rmse(0.0) == math.inf


def test_reference_is_ddim_over_every_timestep():
    """The reference against DDIM's update written out here, over timesteps T-1 .. 0."""
    pipe = _pipe()
    noise = _noise(pipe)
    at_t0, denoised = study.compute_reference(pipe, noise, batch_size=2, progress=False)
    alphas0 = float(pipe.scheduler.alphas_cumprod[0])
    x, x0 = _ddim_by_formula(pipe, noise, list(range(SHORT_SCHEDULE - 1, -1, -1)), alphas0)
    torch.testing.assert_close(at_t0.double(), x, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoised.double(), x0, rtol=1e-4, atol=1e-4)


def test_sampler_error_against_an_independent_computation():
    """A sweep row of DDIM-5: its latent RMSE against numpy on the formula's DDIM-5 and
    reference; its PSNR against numpy on the decoded images."""
    pipe = _pipe(SWEEP_SCHEDULE)
    noise = _noise(pipe)
    at_t0, denoised = study.compute_reference(pipe, noise, batch_size=3, progress=False)
    reference = {"at_t0": (at_t0, study.decode_images(pipe, at_t0, 3)),
                 "zero": (denoised, study.decode_images(pipe, denoised, 3))}
    rows = study.sweep(pipe, ["ddim"], [5], noise, reference, batch_size=2, progress=False)
    row = next(r for r in rows if r["steps"] == 5)
    # DDIM-5, "leading" spacing, steps_offset 1: timesteps 81, 61, 41, 21, 1, then alpha_0.
    alphas0 = float(pipe.scheduler.alphas_cumprod[0])
    x5, _ = _ddim_by_formula(pipe, noise, [81, 61, 41, 21, 1], alphas0)
    ref, _ = _ddim_by_formula(pipe, noise, list(range(SWEEP_SCHEDULE - 1, -1, -1)), alphas0)
    expected = np.sqrt(np.mean((x5.numpy() - ref.numpy()) ** 2))
    assert row["endpoint"] == "at_t0" and row["unet_evals"] == 5
    assert row["latent_rmse"] == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():
        img5 = (pipe.decode_latents(x5.float()) / 2 + 0.5).clamp(0, 1).numpy()
    ref_img = reference["at_t0"][1].numpy()
    pixel = np.sqrt(np.mean((img5 - ref_img) ** 2))
    assert row["psnr_db"] == pytest.approx(20 * np.log10(1 / pixel), abs=0.05)


def test_ddim_error_falls_with_steps():
    pipe = _pipe(SWEEP_SCHEDULE)
    noise = _noise(pipe)
    at_t0, denoised = study.compute_reference(pipe, noise, batch_size=3, progress=False)
    reference = {"at_t0": (at_t0, study.decode_images(pipe, at_t0, 3)),
                 "zero": (denoised, study.decode_images(pipe, denoised, 3))}
    rows = study.sweep(pipe, ["ddim"], [2, 5, 10, 25], noise, reference, batch_size=3,
                       progress=False)
    errors = [next(r["latent_rmse"] for r in rows if r["steps"] == n) for n in (2, 5, 10, 25, 50)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


@pytest.mark.slow
def test_ddim_1000_steps_against_itself_is_exact():
    """Through the pipeline, DDIM over all 1,000 timesteps lands on the reference exactly."""
    pipe = build_tiny_pipeline()
    noise = _noise(pipe, 2)
    at_t0, _ = study.compute_reference(pipe, noise, batch_size=2, progress=False)
    scheduler = study.reference_scheduler(pipe.scheduler.config)
    latents, _, _ = study.run_sampler(pipe, scheduler, 1000, noise, batch_size=2)
    assert study.latent_rmse(latents, at_t0) == 0.0


def test_reference_through_the_pipeline_is_exact_on_a_short_schedule():
    pipe = _pipe()
    noise = _noise(pipe, 2)
    at_t0, _ = study.compute_reference(pipe, noise, batch_size=2, progress=False)
    scheduler = study.reference_scheduler(pipe.scheduler.config)
    latents, _, _ = study.run_sampler(pipe, scheduler, SHORT_SCHEDULE, noise, batch_size=2)
    assert study.latent_rmse(latents, at_t0) == 0.0
    # and a sampler that is not converged is not: the error measures something
    latents, _, _ = study.run_sampler(pipe, make_scheduler("ddim", pipe.scheduler.config), 10,
                                      noise, batch_size=2)
    assert study.latent_rmse(latents, at_t0) > 1e-3


def test_samplers_endpoints_and_unet_evaluations():
    config = build_tiny_pipeline().scheduler.config
    dpm = make_scheduler("dpm++2m", config)
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    assert make_scheduler("dpm++", config).config.solver_order == 3
    for name in study.STUDY_SAMPLERS:
        scheduler = make_scheduler(name, config)
        assert study.ends_at_zero(scheduler) == (name != "ddim"), name
        expected = 2 * 8 - 1 if name == "heun" else 8
        assert study.unet_evaluations(scheduler, 8) == expected, name


def test_new_samplers_draw_finite_images():
    pipe = build_tiny_pipeline()
    noise = _noise(pipe, 2)
    for name in ("dpm++2m", "unipc", "heun"):
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        images = pipe(latents=noise, num_inference_steps=4, output_type="pt").images
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all(), name


def _row(sampler, steps, rmse, evals=None, ips=1.0):
    return {"sampler": sampler, "steps": steps, "latent_rmse": rmse,
            "unet_evals": evals or steps, "images_per_s": ips}


def test_summary_finds_the_fewest_steps_within_ddim50():
    rows = [_row("ddim", 50, 0.10), _row("ddim", 35, 0.14), _row("ddim", 20, 0.2),
            _row("unipc", 8, 0.11), _row("unipc", 10, 0.09, ips=3.0),
            _row("unipc", 15, 0.05), _row("heun", 5, 0.2, 9), _row("heun", 8, 0.08, 15),
            _row("euler", 50, 0.3)]
    s = study.summarise(rows)
    assert s["bar"]["latent_rmse"] == 0.10
    assert {k: (v and v["steps"]) for k, v in s["matches"].items()} == \
        {"ddim": 50, "unipc": 10, "heun": 8, "euler": None}
    assert (s["recommended"]["sampler"], s["recommended"]["steps"]) == ("unipc", 10)


def test_reference_cache_is_reused_only_for_its_key(tmp_path, monkeypatch):
    pipe = _pipe(20)
    noise = _noise(pipe, 2)
    cache = tmp_path / "ref.safetensors"
    a, b, cached = study.load_or_compute_reference(pipe, noise, cache, "k1", 2, False)
    assert not cached
    calls = []
    monkeypatch.setattr(study, "compute_reference",
                        lambda *args, **kw: calls.append(1) or (a + 1, b + 1))
    a2, b2, cached = study.load_or_compute_reference(pipe, noise, cache, "k1", 2, False)
    assert cached and not calls and torch.equal(a2, a) and torch.equal(b2, b)
    a3, _, cached = study.load_or_compute_reference(pipe, noise, cache, "k2", 2, False)
    assert not cached and calls == [1] and torch.equal(a3, a + 1)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    from ffhq_ldm.cli import main as cli_main

    build_tiny_pipeline().save_pretrained(str(tmp_path / "pipe"))
    for argv, words in ((["--steps", "5,1000"], "below the model's 1000 training timesteps"),
                        (["--num", "0"], "--num must be >= 1"),
                        (["--samplers", "ddim,ddpm"], "stochastic")):
        with pytest.raises(SystemExit) if argv[0] == "--samplers" else nullcontext():
            code = cli_main(["sampler-study", "--model", str(tmp_path / "pipe"), "--out",
                             str(tmp_path / "out"), *argv])
            assert code == 2
        assert words in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()
