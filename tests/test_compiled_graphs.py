"""Every compiled network runs as whole graphs: no graph break, no recompilation.

A graph break splits a compiled network into pieces with Python between them (slower, and a
sign that something in the step is host-side); a recompilation means a guard failed, i.e.
something changed between steps that should not (a shape, a dtype, a flag, a Python value),
and costs a full compilation in the middle of a run. Each test runs a compiled training step
as the trainers build it (``stage2.build`` / ``stage1.build`` with ``compile=True``) for 10
steps that include the LR warm-up, a non-finite step that the guard skips, and a checkpoint
saved, loaded into a freshly built step (as a resumed process does) and continued; then the
latent encoder as compiled for encoding. ``torch._dynamo``'s counters must show the expected
number of graphs and no break, and ``error_on_recompile`` turns any recompilation into an
error. The backend is ``aot_eager`` (dynamo and AOT autograd, as inductor gets them, without
inductor's minutes of CPU code generation): graph breaks and guards are decided before it.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest
import torch
import torch._dynamo

from ffhq_ldm.config import get_preset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def dynamo(monkeypatch):
    """Fresh dynamo state, compilation forced to ``aot_eager``, recompiling an error."""
    from torch._dynamo.utils import counters

    from ffhq_ldm import speed
    from ffhq_ldm.train import stage2

    real = speed.maybe_compile
    patched = functools.partial(real, backend="aot_eager")
    monkeypatch.setattr(speed, "maybe_compile", patched)  # what the autoencoder step imports
    monkeypatch.setattr(stage2, "maybe_compile", patched)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


def _assert_whole_graphs(counters, graphs: int) -> None:
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def _unet_parts(cfg, latent_shape):
    from ffhq_ldm.train import stage2

    return stage2.build(None, cfg, latent_shape, compile=True, device="cpu")


@pytest.mark.slow  # ~35 s on a loaded 2-core CPU
def test_compiled_unet_step_is_one_graph_through_warmup_nan_and_resume(dynamo, tmp_path):
    from ffhq_ldm.data.latents import LatentCache
    from ffhq_ldm.losses.diffusion import draw_global_batch

    cfg = replace(get_preset("tiny", "unet"), warmup_steps=4, batch_size=4)
    latent_shape = (4, 8, 8)
    g = torch.Generator().manual_seed(0)
    cache = LatentCache(torch.randn(16, *latent_shape, generator=g).half(),
                        0.1 * torch.rand(16, *latent_shape, generator=g).half(), 1.0)

    def run(parts, steps):
        lrs = []
        for step in steps:
            batch = draw_global_batch(cfg.seed, step, cfg.batch_size, len(cache), latent_shape,
                                      cfg.num_train_timesteps)
            if step == 5:  # a non-finite step: the guard skips the update
                batch["noise"] = torch.full_like(batch["noise"], float("nan"))
            lrs.append(parts.opt.param_groups[0]["lr"])
            result = parts.step(cache, batch)
            parts.guard.record(result.skipped, step)  # as the training loop does
            assert bool(result.skipped) is (step == 5)
        return lrs

    parts = _unet_parts(cfg, latent_shape)
    assert parts.speed["compiled"]
    lrs = run(parts, range(7))
    assert lrs[:4] == pytest.approx([cfg.learning_rate * (s + 1) / 4 for s in range(4)])
    assert parts.guard.state_dict()["total"] == 1
    path = tmp_path / "checkpoint.pt"
    torch.save({"unet": parts.unet.state_dict(), "opt": parts.opt.state_dict(),
                "lr": parts.lr_sched.state_dict(), "guard": parts.guard.state_dict()}, path)
    parts.ema.save(tmp_path / "ema.safetensors")
    _assert_whole_graphs(dynamo, 1)

    # resumed: a freshly built step (the process's first compilation) loads the checkpoint
    torch._dynamo.reset()
    dynamo.clear()
    resumed = _unet_parts(cfg, latent_shape)
    state = torch.load(path)
    resumed.unet.load_state_dict(state["unet"])
    resumed.opt.load_state_dict(state["opt"])
    resumed.lr_sched.load_state_dict(state["lr"])
    resumed.guard.load_state_dict(state["guard"], step=7)
    resumed.ema.load(tmp_path / "ema.safetensors")
    run(resumed, range(7, 10))
    _assert_whole_graphs(dynamo, 1)


def _vae_parts(cfg, lpips):
    from ffhq_ldm.train import stage1

    return stage1.build(None, cfg, device="cpu", perceptual=lpips, compile=True)


@pytest.mark.slow  # 2-7 min on a loaded 2-core CPU (LPIPS' VGG traced twice)
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_compiled_autoencoder_step_is_whole_graphs_through_disc_start_nan_and_resume(
        dynamo, tmp_path, kind):
    """Four graphs: the autoencoder up to its last layer, LPIPS, the generator's adversarial
    term and the discriminator (its two calls in its own step share one)."""
    from ffhq_ldm.losses.perceptual import build_perceptual

    torch.manual_seed(1234)
    lpips = build_perceptual("lpips-vgg-random-trunk")
    cfg = replace(get_preset("tiny", "vae"), autoencoder=kind, disc_start=3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(10, 2, 3, 32, 32, generator=g) * 2 - 1

    def run(parts, steps):
        for step in steps:
            x = images[step]
            if step == 5:  # a non-finite batch: the guard skips both updates
                x = torch.full_like(x, float("nan"))
            result = parts.step(x, step)
            parts.guard.record(result.skipped, step)  # as the training loop does
            assert bool(result.skipped) is (step == 5)
            assert ("disc/adaptive_weight" in result.logs) is (step >= cfg.disc_start)

    parts = _vae_parts(cfg, lpips)
    assert parts.speed["compiled"]
    run(parts, range(7))
    assert parts.guard.state_dict()["total"] == 1
    path = tmp_path / "checkpoint.pt"
    torch.save({"vae": parts.recon.state_dict(), "disc": parts.disc.state_dict(),
                "opt_g": parts.opt_g.state_dict(), "opt_d": parts.opt_d.state_dict(),
                "guard": parts.guard.state_dict()}, path)
    _assert_whole_graphs(dynamo, 4)

    torch._dynamo.reset()
    dynamo.clear()
    resumed = _vae_parts(cfg, lpips)
    state = torch.load(path)
    resumed.recon.load_state_dict(state["vae"])
    resumed.disc.load_state_dict(state["disc"])
    resumed.opt_g.load_state_dict(state["opt_g"])
    resumed.opt_d.load_state_dict(state["opt_d"])
    resumed.guard.load_state_dict(state["guard"], step=7)
    run(resumed, range(7, 10))
    _assert_whole_graphs(dynamo, 4)


def test_compiled_latent_encoder_is_one_graph(dynamo):
    """The posterior encoder as ``ffhq-ldm bench`` compiles it for encoding (no gradients,
    one batch shape), over 10 batches, the same results as eager."""
    from ffhq_ldm.bench import _encoder
    from ffhq_ldm.models.vae import build_vae, encode_posterior
    from ffhq_ldm.speed import maybe_compile

    torch.manual_seed(0)
    vae = build_vae(get_preset("tiny", "vae")).eval().requires_grad_(False)
    encoder = maybe_compile(_encoder(vae), enabled=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(10):
            x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
            mean, std = encoder(x)
            ref_mean, ref_std = encode_posterior(vae, x)
            torch.testing.assert_close(mean, ref_mean)
            torch.testing.assert_close(std, ref_std)
    _assert_whole_graphs(dynamo, 1)
