"""ffhq_ldm.speed and the UNet train step against the plain training path, and `ffhq-ldm bench`
end to end on a CPU.

The plain path is written out here from its definitions (the forward process, the MSE, the
reference AdamW without foreach), so the fast path is checked against an independent
computation, not against itself.
"""

import json
import math

import pytest
import torch

from ffhq_ldm.config import get_preset
from ffhq_ldm.data.latents import LatentCache
from ffhq_ldm.losses.diffusion import DiffusionLoss, draw_global_batch
from ffhq_ldm.models.unet import build_train_scheduler, build_unet
from ffhq_ldm.speed import compile_wanted, maybe_compile, to_channels_last
from ffhq_ldm.train.ema import EMA
from ffhq_ldm.train.steps import UNetTrainStep

LATENT = (4, 8, 8)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_unet(get_preset("tiny", "unet"), LATENT[0], LATENT[1])


def random_cache(entries=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn((entries, *LATENT), generator=g).half()
    std = (0.1 * torch.rand((entries, *LATENT), generator=g)).half()
    return LatentCache(mean, std, scaling_factor=0.7)


def alphas_cumprod():
    return build_train_scheduler(get_preset("tiny", "unet")).alphas_cumprod


def well_posed(named_params):
    """Parameters whose gradient is not zero in exact arithmetic.

    Attention's key bias adds q·b to every logit of a query's row, which softmax ignores: its
    exact gradient is 0, so its computed gradient is rounding noise, and Adam (g / sqrt(v))
    turns noise of either sign into a full-size step. Comparing it would compare noise.
    """
    return [(n, p) for n, p in named_params if not n.endswith("to_k.bias")]


def assert_same_updates(start, plain, fast, tol=1e-2):
    """Each tensor's update (after - start) agrees to ``tol`` in relative norm.

    Not elementwise: Adam divides by sqrt(v), so an element whose two gradients nearly cancel
    amplifies rounding differences (channels_last sums in another order) into a few % of one
    step. The update of a whole tensor is well conditioned.
    """
    for (name, p0), (_, p), (_, q) in zip(start, plain, fast, strict=True):
        want, got = p.detach() - p0, q.detach() - p0
        assert want.norm() > 0, name  # it moved: the comparison is not vacuous
        assert (got - want).norm() <= tol * want.norm(), name


def batch(step, size=4, entries=32):
    return draw_global_batch(0, step, size, entries, LATENT, 1000)


def plain_loss(unet, cache, b):
    """The DDPM ε-loss from its formula, in fp32: mean (ε_θ(√ᾱ z + √(1−ᾱ) ε, t) − ε)²."""
    idx = b["indices"]
    z = cache.mean[idx].float() + cache.std[idx].float() * b["latent_noise"]
    z = z * cache.scaling_factor
    a = alphas_cumprod()[b["timesteps"]].view(-1, 1, 1, 1)
    noisy = a.sqrt() * z + (1 - a).sqrt() * b["noise"]
    return (unet(noisy, b["timesteps"]).sample - b["noise"]).pow(2).mean()


def test_fast_step_loss_matches_the_fp32_formula_within_bf16_tolerance():
    cache = random_cache()
    reference = tiny_unet()
    with torch.no_grad():
        want = plain_loss(reference, cache, batch(0)).item()

    unet = tiny_unet()
    to_channels_last(unet)
    step = UNetTrainStep(unet, DiffusionLoss(alphas_cumprod()),
                         torch.optim.AdamW(unet.parameters(), lr=1e-3, foreach=True),
                         ema=EMA(unet, 0.99), autocast_dtype=torch.bfloat16)
    loss, logs, _, skipped = step(cache, batch(0))
    assert loss.device.type == "cpu" and not loss.requires_grad  # detached, never .item()'d
    assert skipped is None  # no guard given
    # bf16 keeps 8 bits of mantissa: the UNet's output carries ~0.4% error per element, and the
    # mean square over 1024 elements averages most of it away.
    assert loss.item() == pytest.approx(want, rel=2e-2)
    assert logs["loss/mse"].item() == pytest.approx(loss.item())


def test_channels_last_and_foreach_adamw_give_the_plain_weights_after_two_steps():
    cache = random_cache()
    # weight decay large enough that leaving it out would show in the comparison
    clip, lr, betas, wd, decay = 1.0, 1e-3, (0.9, 0.99), 0.5, 0.9
    start = [(n, p.detach().clone()) for n, p in tiny_unet().named_parameters()]

    # plain: contiguous weights, the reference (for-loop) AdamW, clipping and EMA by hand
    plain = tiny_unet()
    opt = torch.optim.AdamW(plain.parameters(), lr=lr, betas=betas, weight_decay=wd,
                            foreach=False, fused=False)
    shadow = [p.detach().clone() for p in plain.parameters()]
    for i in range(2):
        plain_loss(plain, cache, batch(i)).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), clip, foreach=False)
        opt.step()
        opt.zero_grad()
        d = min(decay, (1 + i + 1) / (10 + i + 1))  # LDM's EMA warm-up, update m = i + 1
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, plain.parameters(),
                                                               strict=True)]

    # fast: channels_last weights, foreach AdamW, UNetTrainStep in fp32
    fast = to_channels_last(tiny_unet())
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(fast.parameters(), lr=lr, betas=betas, weight_decay=wd,
                                  foreach=True)
    ema = EMA(fast, decay)
    step = UNetTrainStep(fast, DiffusionLoss(alphas_cumprod()), optimizer, ema=ema,
                         grad_clip=clip, autocast_dtype=None)
    for i in range(2):
        step(cache, batch(i))

    names = [n for n, _ in start]
    assert_same_updates(well_posed(start), well_posed(plain.named_parameters()),
                        well_posed(fast.named_parameters()))
    assert_same_updates(well_posed(start), well_posed(zip(names, shadow, strict=True)),
                        well_posed(zip(names, ema.shadow, strict=True)))


def _guard():
    """The trainers' non-finite guard in its sync-free mode."""
    from ffhq_ldm.train.resilience import NonFiniteGuard

    return NonFiniteGuard(3, "cpu", deferred=True)


@pytest.mark.parametrize("with_guard", [False, True], ids=["plain", "guard"])
def test_fast_step_never_reads_a_tensor_back_to_the_host(monkeypatch, with_guard):
    # On a GPU each of these waits for every queued kernel. A CPU has no sync to catch, so
    # catch the Python-level reads instead (the bench counts real CUDA syncs on a GPU).
    unet = to_channels_last(tiny_unet())
    # the fused kernel, as the trainers pick; foreach/for-loop AdamW read a CPU step count
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    step = UNetTrainStep(unet, DiffusionLoss(alphas_cumprod()), optimizer, ema=EMA(unet, 0.99),
                         lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                         guard=_guard() if with_guard else None)
    cache, b = random_cache(), batch(0)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host during the step")
    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    result = step(cache, b)
    monkeypatch.undo()
    assert math.isfinite(result.loss.item()) and math.isfinite(result.grad_norm.item())
    assert (result.skipped is not None) == with_guard


def test_a_non_finite_loss_skips_the_update_with_the_guard():
    unet = tiny_unet()
    before = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)
    ema = EMA(unet, 0.99)
    step = UNetTrainStep(unet, DiffusionLoss(alphas_cumprod()), optimizer, ema=ema,
                         guard=_guard(), autocast_dtype=None)
    cache = random_cache()
    cache.mean[0] = float("nan")
    b = batch(0)
    b["indices"][0] = 0  # one NaN latent poisons the batch's loss
    result = step(cache, b)
    assert bool(result.skipped) and not math.isfinite(result.loss.item())
    assert all(torch.equal(p, q) for p, q in zip(before, unet.parameters(), strict=True))
    assert all(torch.equal(p, s) for p, s in zip(before, ema.shadow, strict=True))
    assert all(p.grad is None for p in unet.parameters())  # zeroed for the next step


def test_two_micro_batches_make_the_step_of_their_union():
    from ffhq_ldm.losses.diffusion import slice_for

    cache, whole = random_cache(), batch(0, size=4)
    start = [(n, p.detach().clone()) for n, p in tiny_unet().named_parameters()]
    results = []
    for parts in ([whole], [slice_for(whole, 2, r, 0, 1) for r in range(2)]):
        unet = tiny_unet()
        step = UNetTrainStep(unet, DiffusionLoss(alphas_cumprod()),
                             torch.optim.AdamW(unet.parameters(), lr=1e-3), grad_clip=1.0,
                             autocast_dtype=None)
        result = step(cache, parts)
        results.append((result.loss, result.grad_norm, list(unet.named_parameters())))
    (loss_a, norm_a, weights_a), (loss_b, norm_b, weights_b) = results
    # mean over 4 = mean of the two means over 2; the same gradient, so the same update
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    assert norm_a.item() == pytest.approx(norm_b.item(), rel=1e-4)
    assert_same_updates(well_posed(start), well_posed(weights_a), well_posed(weights_b))


def test_fast_step_with_an_lr_schedule_steps_it_once_per_call():
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    step = UNetTrainStep(unet, DiffusionLoss(alphas_cumprod()), optimizer,
                         lr_scheduler=schedule, autocast_dtype=None)
    step(random_cache(), batch(0))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)


def test_maybe_compile_is_off_on_cpu_and_keeps_the_module_for_state_dict(monkeypatch):
    monkeypatch.delenv("FFHQ_LDM_COMPILE", raising=False)
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU(),
                                 torch.nn.Conv2d(4, 2, 1))
    assert maybe_compile(module) is module  # CPU: off unless asked
    assert maybe_compile(module, enabled=False) is module
    monkeypatch.setenv("FFHQ_LDM_COMPILE", "0")
    assert not compile_wanted(module, None)
    monkeypatch.setenv("FFHQ_LDM_COMPILE", "1")
    assert compile_wanted(module, None) and not compile_wanted(module, False)

    keys = list(module.state_dict())
    # the "eager" backend runs dynamo's tracing without inductor's C++ build: seconds, not minutes
    compiled = maybe_compile(module, enabled=True, backend="eager")
    assert compiled is not module
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(compiled(x), module(x))
    assert list(module.state_dict()) == keys  # save the original; the wrapper adds _orig_mod.
    assert all(a is b for a, b in zip(compiled.parameters(), module.parameters(),
                                      strict=True))

    same = maybe_compile(module, enabled=True, backend="eager", in_place=True)
    assert same is module and list(module.state_dict()) == keys
    assert torch.allclose(module(x), compiled(x))


def test_reloaded_moments_get_the_channels_last_layout_back():
    from ffhq_ldm.speed import match_state_layout

    def one_more_step(kind, fix):
        torch.manual_seed(0)
        w = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
        w = torch.nn.Parameter(w)
        options = {"fused": {"fused": True}, "loop": {"foreach": False}}[kind]
        opt = torch.optim.AdamW([w], lr=1e-2, **options)
        w.grad = torch.randn_like(w)
        opt.step()
        # what a checkpoint gives back: the same numbers, stored contiguous
        saved = opt.state_dict()
        for key in ("exp_avg", "exp_avg_sq"):
            saved["state"][0][key] = saved["state"][0][key].contiguous()
        opt = torch.optim.AdamW([w], lr=1e-2, **options)
        opt.load_state_dict(saved)
        if fix:
            match_state_layout(opt)
            assert opt.state[w]["exp_avg"].stride() == w.stride()
        w.grad = torch.randn_like(w)
        opt.step()
        return w.detach()

    reference = one_more_step("loop", fix=False)  # indexes logically: layout cannot matter
    assert torch.allclose(one_more_step("fused", fix=True), reference, atol=1e-6)
    # the hazard the helper exists for: fused AdamW pairs weights with the wrong moments
    assert not torch.allclose(one_more_step("fused", fix=False), reference, atol=1e-4)


def test_flop_counter_sees_attention_on_cpu():
    from ffhq_ldm.bench import count_flops

    b, h, n, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * b * h * n * n * d)  # QKᵀ and softmax(·)V, 2 FLOPs per MAC


# ---------------------------------------------------------------------------------------------
# The benchmark on the tiny preset

def _positive_finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_bench_runs_on_cpu_and_writes_every_number(tmp_path, capsys):
    from ffhq_ldm.bench import TASKS, main

    out = tmp_path / "bench.json"
    code = main(["--preset", "tiny", "--device", "cpu", "--batch-size", "2,4",
                 "--vae-batch-size", "2", "--steps", "2", "--warmup", "1", "--sample-steps", "10",
                 "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "x base" in printed and "train-unet" in printed and "lpips-vgg" in printed

    assert report["device"]["type"] == "cpu"
    assert {"torch", "diffusers", "accelerate"} <= set(report["versions"])
    assert _positive_finite(report["peak"]["tflops"]) and "fp32" in report["peak"]["what"]
    flops = report["flops_gflop_per_image"]
    for key in ("unet_forward", "unet_train_step", "vae_train_step", "encode", "decode", "sample"):
        assert _positive_finite(flops[key]), key
    # backward costs about twice the forward (grad wrt inputs and wrt weights)
    assert 2.5 < flops["unet_train_step"] / flops["unet_forward"] <= 3.0
    assert flops["sample"] == pytest.approx(10 * flops["unet_forward"] + flops["decode"], rel=1e-4)
    assert report["perceptual"].startswith("lpips-vgg")

    results = report["results"]
    assert {r["task"] for r in results} == set(TASKS)
    for r in results:
        assert "error" not in r and "skipped" not in r, r
        for key in ("images_per_s", "seconds_per_iteration", "achieved_tflops",
                    "fraction_of_peak", "speedup_vs_baseline", "gflop_per_image"):
            assert _positive_finite(r[key]), (r["task"], r["variant"], key)
        assert r["peak_memory_gib"] is None  # the CUDA allocator's peak; no such number on a CPU
        base = next(b for b in results if b["task"] == r["task"] and b["variant"] == "fp32 eager")
        assert r["speedup_vs_baseline"] == pytest.approx(r["images_per_s"] / base["images_per_s"])
        assert r["achieved_tflops"] == pytest.approx(r["gflop_per_image"] * r["images_per_s"] / 1e3)
    variants = {(r["task"], r["variant"], r["batch_size"]) for r in results}
    assert ("train-unet", "fp32 eager", 2) in variants
    assert ("train-unet", "bf16+CL+fused", 4) in variants
    assert ("sample", "bf16+CL", 4) in variants
    assert not any("compile" in v for _, v, _ in variants)  # compile runs on CUDA only
    assert all(_positive_finite(r["projected_training_hours"]) for r in results
               if r["task"] == "train-unet")
    # the sampling rows: the tiny UNet is called once per DDIM step
    assert {(r["variant"], r["sample_steps"], r["unet_calls"]) for r in results
            if r["task"] == "sample"} == {("bf16+CL", 10, 10), ("fp32 eager", 50, 50)}
    # SDPA: the math kernel takes any shape, and the default picks a backend that runs alone
    attention = report["attention"]
    assert attention["backends"]["MATH"] == "runs" and attention["shapes"]
    assert attention["default_picks"]
    for pick in attention["default_picks"]:
        assert attention["backends"][pick.split(" ")[0]] == "runs"
    # the profile: at most 10 operators, most expensive first, each a share of the whole
    top = next(r for r in results if "profile" in r)["profile"]["top"]
    times = [e["ms_per_step"] for e in top]
    assert 0 < len(top) <= 10 and times == sorted(times, reverse=True)
    assert 0 < sum(e["share"] for e in top) <= 1 + 1e-9
    assert [t["verdict"] for t in report["targets"]] == ["n/a (no CUDA)"] * 5


def test_the_bench_times_the_trainers_own_steps(monkeypatch):
    """The train rows run stage1/stage2's step objects, as the trainers build them: the
    non-finite guard on, the configs' clipping, fused optimisers with the configs' betas."""
    from ffhq_ldm import bench
    from ffhq_ldm.train.steps import AutoencoderTrainStep

    seen = []
    for cls in (UNetTrainStep, AutoencoderTrainStep):
        real = cls.__call__

        def spy(self, *args, _real=real, **kwargs):
            seen.append(self)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__call__", spy)
    assert bench.main(["--preset", "tiny", "--device", "cpu", "--only", "train-unet,train-vae",
                       "--batch-size", "2", "--vae-batch-size", "2", "--steps", "1",
                       "--warmup", "1"]) == 0
    unet_steps = [s for s in seen if isinstance(s, UNetTrainStep)]
    vae_steps = [s for s in seen if isinstance(s, AutoencoderTrainStep)]
    assert unet_steps and vae_steps
    vae_cfg, unet_cfg = get_preset("tiny", "vae"), get_preset("tiny", "unet")
    for step in vae_steps:
        assert step.guard is not None and step.grad_clip == vae_cfg.grad_clip
        for opt in (step.opt_g, step.opt_d):
            assert opt.defaults["fused"] and opt.defaults["betas"] == (0.5, 0.9)
    for step in unet_steps:
        assert step.guard is not None and step.grad_clip == unet_cfg.grad_clip
        assert step.lr_scheduler is not None and step.ema is not None
        assert step.optimizer.defaults["betas"] == (unet_cfg.adam_beta1, unet_cfg.adam_beta2)


def test_bench_is_a_subcommand_when_registered():
    import argparse

    from ffhq_ldm.bench import register, run

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--only", "sample,train-unet", "--batch-size", "256,64"])
    assert args.func is run and args.only == ["train-unet", "sample"]
    assert args.batch_size == [64, 256] and args.preset == "ffhq128-f4"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--only", "train"])


@pytest.mark.slow
def test_the_compiled_unet_trainer_matches_the_eager_one_without_recompiling(
        faces32, tmp_path, monkeypatch):
    """train_unet.py with its CUDA default forced on (torch.compile with inductor, 1.5 min of
    compiling on a CPU): the same losses as eager, and one graph for the whole run."""
    import torch._dynamo
    from conftest import load_script

    from ffhq_ldm.models.vae import build_vae
    from ffhq_ldm.train.export import export_vae

    torch.manual_seed(0)
    export_vae(build_vae(get_preset("tiny", "vae")), tmp_path / "vae", 1.0,
               {"holdout": 8, "split_seed": 0, "resolution": 32})
    losses = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("FFHQ_LDM_COMPILE", mode)
        out = tmp_path / f"compile-{mode}"
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert load_script("train_unet").main(
                ["--preset", "tiny", "--no-progress", "--log-with", "none", "--data",
                 str(faces32), "--vae", str(tmp_path / "vae"), "--output-dir", str(out),
                 "--latent-cache", str(tmp_path / "cache"), "--log-every", "1",
                 "--max-steps", "12"]) == 0
        speed = json.loads((out / "config.json").read_text())["run"]["speed"]
        assert speed["compiled"] is (mode == "1")
        losses[mode] = [json.loads(line)["loss"] for line in (out / "log.jsonl").open()]
    assert len(losses["1"]) == 12
    assert losses["1"] == pytest.approx(losses["0"], rel=1e-4)
    assert losses["1"][-1] < losses["1"][0]  # and it trained
