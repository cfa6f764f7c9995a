"""What ``ffhq-ldm bench`` reads beside the timings: memory as a 24 GB card would see it, the
attention kernel SDPA picks for the UNet, and a profiler top-10 of the UNet step.

torch is imported inside the functions: ``ffhq-ldm --help`` must not pay for it.
"""

from __future__ import annotations

import contextlib
import gc

from .bench_targets import GIB

# FFHQ: 70,000 images; the latent cache holds each one and its mirror (data/latents.py).
FFHQ_IMAGES = 70_000

# SDPA's dispatch names the chosen kernel in its aten op (the same on CPU and CUDA).
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
}
# Words in the names of attention kernels (flash, cuDNN's and the memory-efficient ones)
ATTENTION_WORDS = ("attention", "attn", "fmha", "flash", "sdpa")
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


# ---------------------------------------------------------------------------------------------
# Memory

def device_used_bytes(device) -> int:
    """Bytes in use on the whole device (what nvidia-smi shows), through cudaMemGetInfo."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free


@contextlib.contextmanager
def memory_cap(device, cap_gib: float):
    """The caching allocator limited to ``cap_gib`` of the device, as on a card that size."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def trainer_residents(vae_config, latent_shape: tuple, device, images: int = FFHQ_IMAGES):
    """What train_unet.py keeps on the device beside the UNet step: the fp32 autoencoder and
    the latent cache of ``images`` images and their mirrors (float16 mean and std)."""
    import torch

    from .data.latents import STORE_DTYPE, LatentCache
    from .models.vae import build_vae

    vae = build_vae(vae_config).eval().requires_grad_(False).to(device)
    shape = (2 * images, *latent_shape)
    mean = torch.randn(shape, device=device, dtype=STORE_DTYPE)
    std = torch.rand(shape, device=device, dtype=STORE_DTYPE).mul_(0.1)
    return vae, LatentCache(mean, std, scaling_factor=1.0)


def start_peak_window(device) -> int:
    """After warm-up: drop cached blocks, reset the peaks; returns the bytes in use on the
    device outside PyTorch's allocator (CUDA context, kernels, libraries' own memory)."""
    import torch

    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return device_used_bytes(device) - torch.cuda.memory_reserved(device)


def read_peak_window(device, outside: int) -> dict:
    """The peaks since ``start_peak_window``: allocated, reserved, and reserved plus what lies
    outside the allocator (the figure a card of that size has to hold)."""
    import torch

    torch.cuda.synchronize(device)
    reserved = torch.cuda.max_memory_reserved(device)
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": reserved / GIB, "outside_allocator_gib": outside / GIB,
            "peak_total_gib": (reserved + outside) / GIB,
            "device_used_after_gib": device_used_bytes(device) / GIB}


# ---------------------------------------------------------------------------------------------
# Attention

@contextlib.contextmanager
def record_sdpa_shapes(seen: list):
    """Every ``F.scaled_dot_product_attention`` call's (query shape, key shape, dtype)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        entry = (tuple(query.shape), tuple(key.shape), str(query.dtype).replace("torch.", ""))
        if entry not in seen:
            seen.append(entry)
        return real(query, key, *args, **kwargs)
    F.scaled_dot_product_attention = spy
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def sdpa_ops_in(events) -> list[str]:
    """The SDPA kernels named by a profile's events (``key_averages()`` or ``events()``)."""
    found = []
    for event in events:
        name = SDPA_OPS.get(event.key if hasattr(event, "key") else event.name)
        if name and name not in found:
            found.append(name)
    return found


def probe_attention(run_once) -> dict:
    """Which SDPA backends run the UNet's attention alone, and which one the default picks.

    ``run_once()`` runs the UNet's forward and backward once. Each backend is forced in turn
    (``torch.nn.attention.sdpa_kernel``); one that cannot take these shapes raises. The
    default's choice is read from the aten op the dispatcher called, in a profile.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    shapes: list = []
    with record_sdpa_shapes(shapes):
        run_once()
    backends = {}
    for name in BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                run_once()
            backends[name] = "runs"
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()
            backends[name] = "refused: " + (text[0][:160] if text else type(exc).__name__)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_once()
    return {"shapes": [{"query": list(q), "key": list(k), "dtype": d} for q, k, d in shapes],
            "backends": backends, "default_picks": sdpa_ops_in(prof.key_averages())}


# ---------------------------------------------------------------------------------------------
# Profiler

def profile_top(step, device, steps: int = 3, top: int = 10) -> dict:
    """torch.profiler over ``steps`` calls of ``step``: the ``top`` operators by self device
    time on CUDA (self CPU time on a CPU), per step, with the SDPA kernels that ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    attention = [e.key for e in ranked if any(k in e.key.lower() for k in ATTENTION_WORDS)]
    attention += [e.key for e in sorted(events, key=lambda e: getattr(e, attr), reverse=True)
                  if any(k in e.key.lower() for k in ATTENTION_WORDS) and e.key not in attention]
    return {"by": "self device time" if cuda else "self CPU time", "steps": steps,
            "total_ms_per_step": total / 1e3 / steps,
            "sdpa_kernels": sdpa_ops_in(prof.key_averages()),
            "attention_kernels": attention[:6],
            "top": [{"name": e.key, "ms_per_step": getattr(e, attr) / 1e3 / steps,
                     "share": getattr(e, attr) / total, "calls_per_step": e.count / steps}
                    for e in ranked]}


def format_profile(profile: dict) -> str:
    lines = [f"profiler top-{len(profile['top'])} of the UNet step, by {profile['by']} "
             f"({profile['total_ms_per_step']:.3g} ms per step in all):"]
    for e in profile["top"]:
        lines.append(f"  {e['ms_per_step']:9.3f} ms {100 * e['share']:5.1f}% "
                     f"{e['calls_per_step']:7.1f}x  {e['name'][:90]}")
    lines.append("  SDPA ops: " + (", ".join(profile["sdpa_kernels"]) or "none seen")
                 + "; attention kernels: "
                 + (", ".join(k[:60] for k in profile["attention_kernels"]) or "none seen"))
    return "\n".join(lines)


def format_attention(probe: dict) -> str:
    shapes = "; ".join(f"q {tuple(s['query'])} k {tuple(s['key'])} {s['dtype']}"
                       for s in probe["shapes"]) or "none (no attention layer called SDPA)"
    runs = ", ".join(f"{k}: {v}" for k, v in probe["backends"].items())
    picked = ", ".join(probe["default_picks"]) or "none seen"
    return (f"attention (SDPA) in the UNet: shapes {shapes}\n  backends alone: {runs}\n"
            f"  the default picks: {picked}")
