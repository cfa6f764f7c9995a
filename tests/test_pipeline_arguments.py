"""FaceLDMPipeline refuses arguments that cannot work, in words, before any sampling.

Before these checks: eta=2 gave all-NaN (black) images without an error, eta=-1 was accepted,
num_inference_steps=2.5 ended in an IndexError and batch_size=2.0 in a TypeError from randn.
The DDIM bound on eta is checked against the formula of Song et al. 2021 ("Denoising Diffusion
Implicit Models", eq. 12 and 16) on this project's schedule, computed here independently of
diffusers' scheduler.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline

from ffhq_ldm.cli import main as cli_main
from ffhq_ldm.train.export import export_pipeline
from pipelines import FaceLDMPipeline
from pipelines.pipeline_face_ldm import PipelineArgumentError


def tiny_pipeline() -> FaceLDMPipeline:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def run(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "pt")
    return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images


# -- eta ------------------------------------------------------------------------------------------

def ddim_direction_terms(eta: float, steps: int) -> list[float]:
    """1 - alpha_{t-1} - sigma_t^2 at each of ``steps`` DDIM steps (Song et al. 2021, eq. 12,
    with sigma_t from eq. 16), on LDM's linear schedule (betas = linspace(sqrt(0.0015),
    sqrt(0.0195), 1000)^2), 'leading' spacing with offset 1 and alpha_prev of the last step =
    alphas_cumprod[0] (set_alpha_to_one=False): written from the paper, not from diffusers."""
    betas = np.linspace(math.sqrt(0.0015), math.sqrt(0.0195), 1000) ** 2
    abar = np.cumprod(1 - betas)
    stride = 1000 // steps
    timesteps = [i * stride + 1 for i in range(steps)][::-1]
    terms = []
    for t in timesteps:
        a_t = abar[t]
        a_prev = abar[t - stride] if t - stride >= 0 else abar[0]
        sigma2 = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        terms.append(1 - a_prev - sigma2)
    return terms


def test_the_ddim_bound_is_the_papers():
    # Why the pipeline refuses eta > 1: the square root of eq. 12 gets a negative argument.
    assert min(ddim_direction_terms(1.0, 50)) >= 0
    assert min(ddim_direction_terms(2.0, 50)) < 0
    assert min(ddim_direction_terms(2.0, 3)) < 0


def test_eta_2_is_an_error_not_black_images(pipe):
    with pytest.raises(PipelineArgumentError, match=r"eta must be in \[0, 1\]"):
        run(pipe, eta=2.0)


@pytest.mark.parametrize("eta", [-1.0, -1e-6, 1.000001, float("nan"), float("inf"), "0.5", True])
def test_bad_eta_is_refused(pipe, eta):
    with pytest.raises(ValueError, match="eta"):
        run(pipe, eta=eta)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 1])
def test_eta_in_range_gives_finite_images(pipe, eta):
    images = run(pipe, eta=eta)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_eta_is_not_checked_for_samplers_without_it(pipe):
    # Euler's step() takes no eta: the pipeline never passes it, so any value is harmless.
    from diffusers import EulerDiscreteScheduler

    other = FaceLDMPipeline(vae=pipe.vae, unet=pipe.unet,
                            scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    other.set_progress_bar_config(disable=True)
    assert torch.isfinite(run(other, eta=2.0)).all()


# -- integers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("num_inference_steps", 2.5), ("num_inference_steps", 2.0), ("num_inference_steps", 0),
    ("num_inference_steps", -3), ("num_inference_steps", "3"), ("num_inference_steps", None),
    ("batch_size", 2.0), ("batch_size", 0), ("batch_size", True), ("batch_size", "2"),
    ("decode_chunk_size", 0), ("decode_chunk_size", 1.5),
])
def test_non_integer_or_small_counts_are_refused(pipe, name, value):
    with pytest.raises(PipelineArgumentError, match=f"{name} must be an integer >= 1"):
        run(pipe, **{name: value})


def test_numpy_integers_are_integers(pipe):
    images = run(pipe, batch_size=np.int64(2), num_inference_steps=np.int32(2))
    assert images.shape[0] == 2


# -- latents --------------------------------------------------------------------------------------

@pytest.mark.parametrize("latents", [
    np.zeros((1, 4, 16, 16), np.float32),       # not a tensor
    torch.zeros(1, 4, 16, 16, dtype=torch.long),  # not floating point
    torch.zeros(1, 3, 16, 16),                  # channels
    torch.zeros(1, 4, 8, 8),                    # size
    torch.zeros(4, 16, 16),                     # no batch dimension
], ids=["numpy", "long", "channels", "size", "ndim"])
def test_bad_latents_are_refused(pipe, latents):
    with pytest.raises(PipelineArgumentError, match="latents must"):
        run(pipe, latents=latents)


# -- the command line: one line, exit code 2, no images -------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "pipeline"
    export_pipeline(tiny_pipeline(), folder, card={"preset": "tiny"})
    return folder


@pytest.mark.parametrize("eta", ["2", "-1"])
def test_cli_sample_bad_eta_is_one_line_exit_2(exported, tmp_path, capsys, eta):
    out = tmp_path / "samples"
    code = cli_main(["sample", "--model", str(exported), "--num", "2", "--steps", "2",
                     "--eta", eta, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: eta must be in [0, 1]"), err
    assert not list(out.glob("*.png"))


def test_cli_sample_eta_1_writes_images(exported, tmp_path, capsys):
    out = tmp_path / "samples"
    code = cli_main(["sample", "--model", str(exported), "--num", "2", "--steps", "2",
                     "--eta", "1", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    from PIL import Image

    assert np.asarray(Image.open(pngs[0])).std() > 0  # not a flat (black) image


def test_cli_sample_no_progress_shows_no_bar(exported, tmp_path, capsys):
    # diffusers' "Loading pipeline components..." bar is one of diffusers' own tqdm bars
    cli_main(["sample", "--model", str(exported), "--num", "1", "--steps", "1",
              "--out", str(tmp_path / "s"), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "Loading pipeline components" not in captured.err + captured.out
    assert "it/s" not in captured.err and "%|" not in captured.err


def test_cli_sample_bf16_on_cpu_warns(exported, tmp_path, capsys):
    code = cli_main(["sample", "--model", str(exported), "--num", "1", "--steps", "1",
                     "--dtype", "bf16", "--out", str(tmp_path / "s"), "--no-progress",
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: --dtype bf16 on a CPU" in err


