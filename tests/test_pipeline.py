"""Fast tests of FaceLDMPipeline (pipelines/pipeline_face_ldm.py) on CPU.

Every model is built here from the "tiny" preset with seeded random weights: 32 px images,
an f=2 autoencoder (4x16x16 latents) and a ~0.2 M parameter UNet. Nothing is downloaded.
Random weights make the images meaningless, but every property tested (reproducibility,
batch/single equivalence, save/load, output types, samplers, the DDIM update rule, dtypes,
input validation, loading without this package) holds for any weights.

The reference loops for DDIM (Song et al. 2021) and Euler (Karras et al. 2022) are written
from the papers' update rules and the LDM schedule formula, not from diffusers' schedulers, so
they check the pipeline + scheduler configuration against something independent of both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    VQModel,
)

from ffhq_ldm.models.vae import VAELoadError, load_vae
from ffhq_ldm.sampling import make_scheduler
from ffhq_ldm.train.export import export_pipeline
from pipelines import FaceLDMPipeline

# A value that looks measured: anything but 1.0 (which hides a missing division) and 0.18215
# (Stable Diffusion's number, which the pipeline must never fall back to).
SCALING = 0.7
STEPS = 4
LATENT = (4, 16, 16)
IMAGE = (3, 32, 32)


def build_pipeline(autoencoder: str = "kl") -> FaceLDMPipeline:
    return build_tiny_pipeline(autoencoder, SCALING)


def assert_same_images(a, b):
    """For two pipeline instances with equal weights: parameters loaded from safetensors are
    not 64-byte aligned like freshly built ones, so CPU kernels may take another SIMD path and
    round differently (~1e-6). Wrong weights or schedules differ by orders of magnitude more."""
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def sample(pipe, seed=0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    generator = gen(seed) if seed is not None else kwargs.pop("generator")
    return pipe(generator=generator, **kwargs).images


@pytest.fixture
def pipe():
    return build_pipeline()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported KL pipeline folder, shared read-only by the tests that load it."""
    folder = tmp_path_factory.mktemp("export") / "pipeline"
    export_pipeline(build_pipeline(), folder, card={"preset": "tiny"})
    return folder


# ---------------------------------------------------------------------------------------------
# 1-2. reproducibility
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_same_seed_same_images(pipe, eta):
    # Reseed the global RNG differently before each call: the images may depend only on the
    # generator. With eta=1 this fails if the generator does not reach scheduler.step.
    torch.manual_seed(1)
    a = sample(pipe, seed=7, batch_size=2, eta=eta)
    torch.manual_seed(2)
    b = sample(pipe, seed=7, batch_size=2, eta=eta)
    c = sample(pipe, seed=8, batch_size=2, eta=eta)
    assert a.shape == (2, *IMAGE)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_eta_reaches_the_scheduler(pipe):
    # Same starting noise, different eta: eta=1 adds fresh noise each step, so images differ.
    assert (sample(pipe, seed=3, eta=0.0) - sample(pipe, seed=3, eta=1.0)).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batch_with_generator_list_equals_single_calls(pipe, eta):
    batch = sample(pipe, seed=None, generator=[gen(11), gen(12)], batch_size=2, eta=eta)
    one = sample(pipe, seed=11, batch_size=1, eta=eta)
    two = sample(pipe, seed=12, batch_size=1, eta=eta)
    torch.testing.assert_close(batch, torch.cat([one, two]), atol=1e-5, rtol=0)
    assert (one - two).abs().max() > 1e-3  # the two generators really differ


# ---------------------------------------------------------------------------------------------
# 3. export and reload
# ---------------------------------------------------------------------------------------------


def test_export_reload_identical(exported):
    top = sorted(p.name for p in exported.iterdir())
    assert top == sorted(["model_index.json", "vae", "unet", "scheduler", "pipeline.py",
                          "face_ldm_explore.py", "README.md"])
    files = [p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert "vae/diffusion_pytorch_model.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "scheduler/scheduler_config.json" in files
    assert json.loads((exported / "vae" / "config.json").read_text())["scaling_factor"] == SCALING

    loaded = FaceLDMPipeline.from_pretrained(exported, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    fresh = build_pipeline()
    for eta in (0.0, 1.0):
        assert_same_images(sample(loaded, seed=5, batch_size=2, eta=eta),
                           sample(fresh, seed=5, batch_size=2, eta=eta))


# ---------------------------------------------------------------------------------------------
# 4. output types
# ---------------------------------------------------------------------------------------------


def test_output_types_agree(pipe):
    pt = sample(pipe, seed=4, batch_size=2, output_type="pt")
    np_images = sample(pipe, seed=4, batch_size=2, output_type="np")
    pil = sample(pipe, seed=4, batch_size=2, output_type="pil")
    latents = sample(pipe, seed=4, batch_size=2, output_type="latent")

    assert pt.shape == (2, *IMAGE) and pt.dtype == torch.float32
    assert 0 <= pt.min() and pt.max() <= 1
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())

    assert len(pil) == 2 and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    pil_arr = np.stack([np.asarray(im) for im in pil]).astype(np.float64) / 255
    # uint8 rounding moves a value by at most half a level
    assert np.abs(pil_arr - np_images).max() <= 0.5 / 255 + 1e-6

    assert latents.shape == (2, *LATENT)
    decoded = pipe.vae.decode(latents / SCALING).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), pt, atol=1e-6, rtol=0)
    # ... and the division matters: decoding unscaled latents gives other images.
    wrong = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    assert (wrong - pt).abs().max() > 1e-3

    out = pipe(num_inference_steps=STEPS, generator=gen(4), batch_size=2, output_type="pt",
               return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], pt)


# ---------------------------------------------------------------------------------------------
# 5. samplers
# ---------------------------------------------------------------------------------------------

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
            "euler": EulerDiscreteScheduler}


def test_every_sampler_runs(pipe):
    results = {}
    for name, cls in SAMPLERS.items():
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        assert type(pipe.scheduler) is cls
        images = sample(pipe, seed=6, batch_size=2, num_inference_steps=5)
        assert images.shape == (2, *IMAGE), name
        assert torch.isfinite(images).all(), name
        assert 0 <= images.min() and images.max() <= 1, name
        results[name] = images
    dpm = make_scheduler("dpm++", pipe.scheduler.config)
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 3)
    # The swap takes effect: DDIM and DDPM (same timesteps, different update) disagree.
    assert (results["ddim"] - results["ddpm"]).abs().max() > 1e-4


def test_from_pretrained_with_other_scheduler(exported):
    config = FaceLDMPipeline.from_pretrained(exported).scheduler.config
    dpm = DPMSolverMultistepScheduler.from_config(config, solver_order=3)
    loaded = FaceLDMPipeline.from_pretrained(exported, scheduler=dpm)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler is dpm
    # It samples with DPM-Solver++, exactly as an in-memory pipeline with the same swap does.
    reference = build_pipeline()
    reference.scheduler = DPMSolverMultistepScheduler.from_config(config, solver_order=3)
    a = sample(loaded, seed=2)
    assert_same_images(a, sample(reference, seed=2))
    assert (a - sample(build_pipeline(), seed=2)).abs().max() > 1e-4  # not DDIM's images


# ---------------------------------------------------------------------------------------------
# 6-7. both autoencoder kinds; a missing scaling factor is refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cls_name", [("kl", "AutoencoderKL"), ("vq", "VQModel")])
def test_both_autoencoders(kind, cls_name):
    pipe = build_pipeline(kind)
    assert type(pipe.vae).__name__ == cls_name
    images = sample(pipe, seed=1, batch_size=2)
    assert images.shape == (2, *IMAGE) and torch.isfinite(images).all()
    latents = sample(pipe, seed=1, batch_size=2, output_type="latent")
    decoded = (pipe.vae.decode(latents / SCALING).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, images, atol=1e-6, rtol=0)


def test_vq_export_without_scaling_factor_is_refused(tmp_path):
    folder = export_pipeline(build_pipeline("vq"), tmp_path / "vq")
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    del config["scaling_factor"]
    config_path.write_text(json.dumps(config))

    pipe = FaceLDMPipeline.from_pretrained(folder)
    assert isinstance(pipe.vae, VQModel)
    assert pipe.vae.config.scaling_factor == 0.18215  # what diffusers silently filled in
    calls = []
    with pytest.raises(ValueError, match="scaling_factor"):
        pipe(num_inference_steps=2, output_type="pt",
             callback_on_step_end=lambda *a: calls.append(a) or {})
    assert not calls  # refused up front, before spending time on sampling
    with pytest.raises(ValueError, match="scaling_factor"):
        pipe.decode_latents(torch.zeros(1, *LATENT))
    # Undecoded latents do not depend on the scale, so they are still allowed.
    assert pipe(num_inference_steps=2, output_type="latent").images.shape == (1, *LATENT)
    with pytest.raises(VAELoadError, match="scaling_factor"):
        load_vae(folder / "vae")

    # Measuring the scale and registering it afterwards (what the error asks for) is accepted,
    # although diffusers still lists the key among the defaulted ones.
    pipe.vae.register_to_config(scaling_factor=0.9)
    latents = pipe(num_inference_steps=2, generator=gen(0), output_type="latent").images
    images = pipe(num_inference_steps=2, generator=gen(0), output_type="pt").images
    expected = (pipe.vae.decode(latents / 0.9).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)


def test_defaulted_scaling_factor_is_not_exported(tmp_path):
    # diffusers would write the defaulted 0.18215 into vae/config.json as if measured, and the
    # reloaded pipeline could no longer tell: the export itself must refuse.
    pipe = build_pipeline("vq")
    config = {k: v for k, v in pipe.vae.config.items()
              if not k.startswith("_") and k != "scaling_factor"}
    pipe.vae = VQModel(**config)  # built without a scaling factor, as other code might
    with pytest.raises(ValueError, match="scaling_factor"):
        export_pipeline(pipe, tmp_path / "vq")
    assert not (tmp_path / "vq").exists()


# ---------------------------------------------------------------------------------------------
# 8. an independent DDIM written from the paper
# ---------------------------------------------------------------------------------------------


def ldm_alphas_cumprod() -> torch.Tensor:
    """LDM's "linear" schedule (docs/design.md, Noise schedule), from the formula, in float64."""
    betas = torch.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def decode_to_images(vae, latents, scaling):
    return (vae.decode((latents / scaling).float()).sample / 2 + 0.5).clamp(0, 1)


def reference_ddim(unet, vae, latents, steps, scaling, offset=1):
    """Song et al. 2021, eq. 12 with sigma = 0, on LDM's linear schedule, in float64."""
    alphas_cumprod = ldm_alphas_cumprod()
    ratio = 1000 // steps
    x = latents.double()
    for i in reversed(range(steps)):  # "leading" spacing, steps_offset=1
        t = i * ratio + offset
        prev = t - ratio
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[prev] if prev >= 0 else alphas_cumprod[0]  # set_alpha_to_one=False
        eps = unet(x.float(), torch.tensor(t)).sample.double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return decode_to_images(vae, x, scaling)


@torch.no_grad()
def test_matches_ddim_written_from_the_paper(pipe):
    steps = 10
    latents = torch.randn(2, *LATENT, generator=gen(9))
    images = pipe(num_inference_steps=steps, latents=latents.clone(), eta=0.0,
                  output_type="pt").images
    expected = reference_ddim(pipe.unet, pipe.vae, latents, steps, SCALING)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # The comparison is sharp enough to see a one-step shift of the timesteps or a wrong scale.
    assert (images - reference_ddim(pipe.unet, pipe.vae, latents, steps, SCALING, offset=0)
            ).abs().max() > 1e-4
    assert (images - reference_ddim(pipe.unet, pipe.vae, latents, steps, 0.18215)
            ).abs().max() > 1e-3


def reference_euler(unet, vae, latents, steps, scaling):
    """Karras et al. 2022, Algorithm 1 without churn, in the variance-exploding variable
    x_bar = x / sqrt(abar), sigma = sqrt((1 - abar) / abar): x_bar += (sigma' - sigma) eps,
    ending at sigma = 0. The noise-predicting UNet sees x = x_bar / sqrt(sigma^2 + 1)."""
    alphas_cumprod = ldm_alphas_cumprod()
    ratio = 1000 // steps
    ts = [i * ratio + 1 for i in reversed(range(steps))]  # leading spacing, steps_offset=1
    sigmas = [((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt() for t in ts]
    sigmas.append(torch.tensor(0.0, dtype=torch.float64))
    x = latents.double() * (sigmas[0] ** 2 + 1).sqrt()  # unit noise -> x_bar at sigma_max
    for i, t in enumerate(ts):
        eps = unet((x / (sigmas[i] ** 2 + 1).sqrt()).float(), torch.tensor(t)).sample.double()
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
    return decode_to_images(vae, x, scaling)


@torch.no_grad()
def test_euler_matches_karras_algorithm(pipe):
    # Euler is the one sampler here whose init_noise_sigma and scale_model_input are not
    # identities: this catches a pipeline that skips either.
    steps = 6
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    latents = torch.randn(2, *LATENT, generator=gen(10))
    images = pipe(num_inference_steps=steps, latents=latents.clone(), output_type="pt").images
    torch.testing.assert_close(images, reference_euler(pipe.unet, pipe.vae, latents, steps,
                                                       SCALING), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# 9. dtypes and the step callback
# ---------------------------------------------------------------------------------------------


def test_bf16_unet_and_callback(pipe):
    pipe.unet.to(torch.bfloat16)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].dtype))
        return kwargs

    images = sample(pipe, seed=0, batch_size=2, num_inference_steps=STEPS,
                    callback_on_step_end=callback)
    assert [s[0] for s in seen] == list(range(STEPS))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == torch.bfloat16 for s in seen)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert sample(pipe, seed=0, output_type="latent").dtype == torch.bfloat16
    # Every sampler keeps the latents in the UNet's dtype from step to step.
    for name in SAMPLERS:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        dtypes = []

        def record(p, i, t, kw, dtypes=dtypes):
            dtypes.append(kw["latents"].dtype)
            return kw

        images = sample(pipe, seed=0, callback_on_step_end=record)
        assert dtypes == [torch.bfloat16] * STEPS, name
        assert torch.isfinite(images).all(), name


def test_callback_can_modify_latents(pipe):
    def zero_at_end(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == STEPS - 1 else kwargs

    out = sample(pipe, seed=0, batch_size=2, output_type="latent", callback_on_step_end=zero_at_end)
    assert torch.equal(out, torch.zeros(2, *LATENT))

    def scale_midway(p, i, t, kwargs):  # a change mid-way must reach the following steps
        return {"latents": kwargs["latents"] * 3} if i == 1 else kwargs

    a = sample(pipe, seed=0, callback_on_step_end=scale_midway)
    assert (a - sample(pipe, seed=0)).abs().max() > 1e-3
    with pytest.raises(ValueError):
        sample(pipe, seed=0, callback_on_step_end=scale_midway,
               callback_on_step_end_tensor_inputs=["noise_pred"])


# ---------------------------------------------------------------------------------------------
# 10. chunked decoding and input validation
# ---------------------------------------------------------------------------------------------


def test_decode_chunk_size(pipe):
    latents = torch.randn(3, *LATENT, generator=gen(1))
    runs = {n: pipe(num_inference_steps=2, latents=latents, output_type="pt",
                    decode_chunk_size=n).images for n in (1, 2, 16)}
    assert runs[16].shape == (3, *IMAGE)
    for n in (1, 2):
        torch.testing.assert_close(runs[n], runs[16], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [
    dict(output_type="tensor"),
    dict(latents=torch.zeros(1, 3, 16, 16)),
    dict(latents=torch.zeros(1, 4, 8, 8)),
    dict(latents=torch.zeros(4, 16, 16)),
    dict(batch_size=2, generator=[gen(0)] * 3),
    dict(batch_size=2, generator=[gen(0)]),
    # given latents fix the batch (2 here); the generators must match it, not batch_size
    dict(latents=torch.zeros(2, *LATENT), generator=[gen(0)], eta=1.0),
    dict(num_inference_steps=0),
    dict(batch_size=0),
], ids=["output_type", "channels", "size", "ndim", "3_generators", "1_generator",
        "generators_vs_latents", "zero_steps", "zero_batch"])
def test_bad_inputs_raise(pipe, kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    with pytest.raises(ValueError):
        pipe(**kwargs)


# ---------------------------------------------------------------------------------------------
# 11. the exported folder loads with only torch and diffusers
# ---------------------------------------------------------------------------------------------

STANDALONE = textwrap.dedent("""
    import importlib.abc
    import sys

    class Block(importlib.abc.MetaPathFinder):
        # Stands in for a machine without this project: its packages cannot be imported.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("ffhq_ldm", "pipelines"):
                raise ImportError("blocked: " + name)
            return None

    sys.meta_path.insert(0, Block())
    for name in ("ffhq_ldm", "pipelines"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(name + " is importable; the test proves nothing")

    import torch
    from diffusers import DiffusionPipeline

    folder = sys.argv[1]
    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
                                             trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("ffhq_ldm", "pipelines"))
    assert not leaked, leaked
    print("RESULT", type(pipe).__name__, tuple(images.shape), bool(torch.isfinite(images).all()))
""")


def test_export_loads_without_this_package(exported, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(exported)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT FaceLDMPipeline (1, 3, 32, 32) True"], proc.stdout
