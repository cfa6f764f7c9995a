"""Interpolation, DDIM inversion and inpainting (pipelines/face_ldm_explore.py) on CPU.

The tiny seeded pipeline of tests/test_pipeline.py (32 px, 4x16x16 latents, random weights).
Each property is checked against something computed separately here: the pipeline's own
plain sampling call for the interpolation's endpoints, a slerp formula written below, the
pipeline's DDIM scheduler for the inversion round trip, and the VAE's own reconstruction for
inpainting.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from test_pipeline import LATENT, SCALING, STANDALONE, build_pipeline, gen, ldm_alphas_cumprod

from ffhq_ldm.train.export import export_pipeline


@pytest.fixture
def pipe():
    return build_pipeline()


def smooth_image(seed: int) -> torch.Tensor:
    """A (1, 3, 32, 32) image in [0, 1] with large smooth regions, like a photo's."""
    coarse = torch.rand(1, 3, 4, 4, generator=gen(seed))
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Shoemake 1985, written out here on flat float64 vectors."""
    a, b = a.double().flatten(), b.double().flatten()
    theta = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


# ---------------------------------------------------------------------------------------------
# interpolation


def test_seed_noise_is_the_pipelines_own_starting_noise(pipe):
    noise = pipe.seed_noise([3, 17])
    assert noise.shape == (2, *LATENT)
    # pipe(generator=seed) draws its starting noise from that generator: same noise, same image
    plain = pipe(generator=gen(3), num_inference_steps=4, output_type="latent").images
    assert torch.equal(plain, pipe(latents=noise[:1], num_inference_steps=4,
                                   output_type="latent").images)


def test_interpolation_endpoints_and_slerp_path(pipe):
    from pipelines.face_ldm_explore import slerp

    a, b = pipe.seed_noise([3, 17])
    frames = pipe.interpolate(a, b, num_frames=5, num_inference_steps=4, output_type="pt",
                              batch_size=2).images
    assert frames.shape == (5, 3, 32, 32)
    # The endpoints are the two seeds' images as plain sampling makes them (batches of 2 vs 1:
    # CPU kernels may round differently at 1e-6).
    for frame, seed in ((frames[0], 3), (frames[-1], 17)):
        alone = pipe(generator=gen(seed), num_inference_steps=4, output_type="pt").images[0]
        torch.testing.assert_close(frame, alone, atol=1e-5, rtol=0)
    # The middle frames are new images, different from both ends and from each other.
    diffs = (frames[1:] - frames[:-1]).flatten(1).abs().amax(1)
    assert (diffs > 1e-3).all()

    # The path is slerp: the formula written here, the exact endpoints, and constant norm
    # for two vectors of equal norm (b rescaled to a's norm).
    for t in (0.0, 0.25, 0.5, 0.8, 1.0):
        got = slerp(a, b, t).double().flatten()
        if t in (0.0, 1.0):
            assert torch.equal(slerp(a, b, t), a if t == 0 else b)
        else:
            torch.testing.assert_close(got, slerp_reference(a, b, t), atol=1e-6, rtol=1e-6)
    b_eq = b * (a.norm() / b.norm())
    norms = torch.stack([slerp(a, b_eq, k / 10).norm() for k in range(11)])
    torch.testing.assert_close(norms, a.norm().expand(11), atol=0, rtol=1e-5)
    # ... which linear interpolation is not: its midpoint is shorter by about cos(theta / 2).
    assert ((a + b_eq) / 2).norm() < 0.8 * a.norm()


def test_interpolation_frames_use_the_slerp_noises(pipe):
    a, b = pipe.seed_noise([5, 6])
    mid = pipe.interpolate(a, b, num_frames=3, num_inference_steps=2, output_type="latent",
                           batch_size=1).images[1]
    noise = slerp_reference(a, b, 0.5).float().reshape(1, *LATENT)
    expected = pipe(latents=noise, num_inference_steps=2, output_type="latent").images[0]
    torch.testing.assert_close(mid, expected, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# inversion


def inversion_errors(pipe, steps: int) -> tuple[float, float]:
    noise = pipe.seed_noise([3])
    z0 = pipe(latents=noise, num_inference_steps=steps, output_type="latent").images
    inverted = pipe.invert(latents=z0, num_inference_steps=steps).noise
    again = pipe(latents=inverted, num_inference_steps=steps, output_type="latent").images
    noise_rms = float((inverted - noise).pow(2).mean().sqrt())
    latent_rel = float((again - z0).abs().max() / z0.abs().max())
    return noise_rms, latent_rel


def test_inversion_of_a_ddim_sample_recovers_its_noise(pipe):
    # Measured on this pipeline: noise RMS error 0.112 (10 steps), 0.027 (40 steps);
    # regenerated latents within 14% (10 steps) and 3.5% (40 steps) of the sample's largest
    # value (random weights make latents of size ~200). First order in the step size, as
    # an Euler step of the reverse ODE should be.
    coarse = inversion_errors(pipe, 10)
    fine = inversion_errors(pipe, 40)
    assert fine[0] < 0.04 and fine[1] < 0.05
    assert fine[0] < coarse[0] / 3 and fine[1] < coarse[1] / 2


def reference_inversion(unet, latents, steps):
    """DDIM eq. 12 (sigma = 0) run from each timestep to the next larger one, on LDM's linear
    schedule from its formula, "leading" spacing with offset 1; starts at abar[0] (DDIM's
    last step ends there, set_alpha_to_one=False). Float64."""
    abar = ldm_alphas_cumprod()
    ratio = 1000 // steps
    x = latents.double()
    for i in range(steps):
        t = i * ratio + 1
        a_t = abar[t]
        a_prev = abar[t - ratio] if t - ratio >= 0 else abar[0]
        eps = unet(x.float(), torch.tensor(t)).sample.double()
        x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    return x


@torch.no_grad()
def test_inversion_matches_the_formula_written_here(pipe):
    z = pipe(latents=pipe.seed_noise([4]), num_inference_steps=6, output_type="latent").images
    got = pipe.invert(latents=z, num_inference_steps=6).noise
    expected = reference_inversion(pipe.unet, z, 6).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_encode_images_is_the_scaled_posterior_mean(pipe):
    x = smooth_image(0)
    expected = pipe.vae.encode(x * 2 - 1).latent_dist.mean * SCALING
    torch.testing.assert_close(pipe.encode_images(x), expected, atol=1e-6, rtol=0)
    from PIL import Image

    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    assert (pipe.encode_images(pil) - expected).abs().max() < 0.05  # uint8 rounding only


def test_vq_pipeline_encodes_before_quantisation_and_inverts():
    pipe = build_pipeline("vq")
    x = smooth_image(0)
    expected = pipe.vae.encode(x * 2 - 1).latents * SCALING
    torch.testing.assert_close(pipe.encode_images(x), expected, atol=1e-6, rtol=0)
    assert pipe.invert(x, num_inference_steps=2).noise.shape == (1, *LATENT)


def test_inverted_image_reconstructs_and_eta_varies(pipe):
    out = pipe.invert(smooth_image(1), num_inference_steps=20)
    assert out.noise.shape == (1, *LATENT) and out.latents.shape == (1, *LATENT)
    assert torch.isfinite(out.noise).all()
    # (An image that is not one of this random model's samples does not come back closely:
    # inversion is exact only along the model's own trajectories, tested above.)
    rec = pipe(latents=out.noise, num_inference_steps=20, output_type="latent").images
    var = pipe(latents=out.noise, num_inference_steps=20, eta=1.0, generator=gen(1),
               output_type="latent").images
    assert float((var - rec).abs().max()) > 0.1


def test_invert_needs_ddim_and_the_model_size(pipe):
    with pytest.raises(ValueError, match="32x32"):
        pipe.invert(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="exactly one"):
        pipe.invert()
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="DDIM"):
        pipe.invert(smooth_image(0), num_inference_steps=2)


# ---------------------------------------------------------------------------------------------
# inpainting


def hole_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 10:24] = 1
    return mask


@pytest.mark.parametrize("resample", [1, 3])
def test_inpainting_keeps_the_known_region(pipe, resample):
    x, mask = smooth_image(2), hole_mask()
    z = pipe.encode_images(x)
    lm = pipe.latent_mask(mask)
    # The latent mask covers every latent cell (2x2 pixels here) that touches the hole.
    expected_cells = torch.zeros(1, 1, 16, 16)
    expected_cells[..., 4:10, 5:12] = 1
    assert torch.equal(lm, expected_cells)

    kw = dict(num_inference_steps=8, resample_steps=resample)
    latents = pipe.inpaint(x, mask, generator=gen(0), output_type="latent", **kw).images
    known = (1 - lm).bool().expand_as(latents)
    assert torch.equal(latents[known], z[known])  # the known cells are the encoded image
    assert float((latents[~known] - z[~known]).abs().mean()) > 1.0  # the hole is generated

    out = pipe.inpaint(x, mask, generator=gen(0), output_type="pt", **kw).images
    with torch.no_grad():
        rec = (pipe.decode_latents(z) / 2 + 0.5).clamp(0, 1)  # what the VAE alone gives back
    keep = (1 - mask).bool().expand_as(x)
    rec_error = float((rec - x)[keep].abs().mean())
    # Known pixels: as close to the input as the VAE's reconstruction is (measured 0.183
    # vs 0.201 mean absolute error; this random decoder's attention mixes in the hole a bit).
    assert float((out - x)[keep].abs().mean()) <= 1.1 * rec_error
    # The hole differs from the reconstruction of what was there.
    assert float((out - rec)[~keep].abs().mean()) > 0.1


def reference_inpainting(unet, z, cells, steps, seed, resample):
    """The masked DDIM loop from its formulas (eq. 12, sigma = 0; RePaint's q(x_t | x_s) going
    back up), float64, noise drawn from one generator in the documented order: the start,
    then per pass the known part's noise (not after the last step), then the way back up."""
    g = gen(seed)
    abar = ldm_alphas_cumprod()
    ratio = 1000 // steps
    x = torch.randn(z.shape, generator=g).double()
    z = z.double()
    for i in reversed(range(steps)):
        t = i * ratio + 1
        s = t - ratio
        a_t, a_s = abar[t], (abar[s] if s >= 0 else abar[0])
        for u in range(resample):
            eps = unet(x.float(), torch.tensor(t)).sample.double()
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
            if s >= 0:
                known = a_s.sqrt() * z + (1 - a_s).sqrt() * torch.randn(z.shape, generator=g)
            else:
                known = z
            x_s = cells * x_s + (1 - cells) * known
            if u < resample - 1:
                x = (a_t / a_s).sqrt() * x_s + (1 - a_t / a_s).sqrt() * torch.randn(
                    z.shape, generator=g)
        x = x_s
    return x


@pytest.mark.parametrize("resample", [1, 2])
@torch.no_grad()
def test_inpainting_matches_the_loop_written_here(pipe, resample):
    x, mask = smooth_image(3), hole_mask()
    got = pipe.inpaint(x, mask, num_inference_steps=5, generator=gen(7), output_type="latent",
                       resample_steps=resample).images
    expected = reference_inpainting(pipe.unet, pipe.encode_images(x), pipe.latent_mask(mask), 5,
                                    7, resample).float()
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=1e-5 * scale, rtol=1e-5)


def test_inpainting_is_seeded_and_checks_inputs(pipe):
    x, mask = smooth_image(2), hole_mask()
    a = pipe.inpaint(x, mask, num_inference_steps=3, generator=gen(1), output_type="pt").images
    b = pipe.inpaint(x, mask, num_inference_steps=3, generator=gen(1), output_type="pt").images
    c = pipe.inpaint(x, mask, num_inference_steps=3, generator=gen(2), output_type="pt").images
    assert torch.equal(a, b) and float((a - c).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="mask must be 32x32"):
        pipe.inpaint(x, torch.ones(1, 1, 16, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="resample_steps"):
        pipe.inpaint(x, mask, num_inference_steps=2, resample_steps=0)


# ---------------------------------------------------------------------------------------------
# on an export loaded with only torch and diffusers

assert "\nimages = pipe(" in STANDALONE  # the part that loads the export, reused
EXPLORE = STANDALONE.split("\nimages = pipe(")[0] + "\n" + textwrap.dedent("""
    a, b = pipe.seed_noise([3, 17])
    frames = pipe.interpolate(a, b, num_frames=3, num_inference_steps=2, output_type="pt").images
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inv = pipe.invert(x, num_inference_steps=2)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:16, 8:16] = 1
    filled = pipe.inpaint(x, mask, num_inference_steps=2, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("ffhq_ldm", "pipelines"))
    assert not leaked, leaked
    print("RESULT", type(pipe).__name__, tuple(frames.shape), tuple(inv.noise.shape),
          tuple(filled.shape))
""")


def test_explore_methods_on_an_export_without_this_package(tmp_path):
    folder = export_pipeline(build_pipeline(), tmp_path / "pipeline")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", EXPLORE, str(folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT FaceLDMPipeline (3, 3, 32, 32) (1, 4, 16, 16) (1, 3, 32, 32)"]
