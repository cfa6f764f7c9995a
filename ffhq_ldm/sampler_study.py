"""``ffhq-ldm sampler-study``: each sampler's error against the converged ODE, and its speed.

    ffhq-ldm sampler-study --model runs/demo/unet_run/pipeline --out sampler_study

Every deterministic sampler solves the same probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations", eq. 13) from the same initial
noise; they differ in how many UNet evaluations they need to get close to its solution. The
reference is that solution, converged: DDIM with eta 0 (Song et al. 2021, "Denoising Diffusion
Implicit Models", eq. 12, a first-order solver of the ODE) over every one of the 1,000 training
timesteps, from the same noises that ``ffhq-ldm sample --seed S`` starts images 0 .. N-1 from.
Each sampler (as ``ffhq-ldm sample --sampler X --steps N`` runs it, through the pipeline) is run
at each step count from those noises; its error is the RMSE over all final latent elements of
all noises against the reference, and the decoded images' PSNR against the reference's decoded
images. Also timed: images/s of the pipeline call plus the decode, on the machine at hand.

Endpoints: DDIM as exported (``set_alpha_to_one=False``) stops at the noise level of timestep 0;
the other samplers step from their last timestep to noise level 0. The reference keeps both:
its state at timestep 0, and the data prediction made there (the same last step the others
take). Each sampler is compared with the reference at its own endpoint.

The reference (1,000 UNet evaluations per noise, all noises in one batch by default) is cached
in the output folder under a key of the model's UNet weights and scheduler config, the noise
seed and the number of noises: a rerun on the same model costs only the sweep.

Writes ``OUT/sampler_study.md`` (tables) and ``OUT/sampler_study.json`` (every figure).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import time
from pathlib import Path

from .cli_common import DefaultsHelpFormatter, UsageError

STUDY_SAMPLERS = ("ddim", "dpm++2m", "unipc", "euler", "heun")
DEFAULT_STEPS = (5, 8, 10, 15, 20, 25, 35, 50)
REFERENCE_STEPS = 1000
BAR_SAMPLER, BAR_STEPS = "ddim", 50  # the paper's setting: the error every sampler must match


# ---------------------------------------------------------------------------------------------
# Command line (argparse only: torch loads when it runs)

def _int_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"step counts must be integers >= 1: {text!r}")
    return values


def _sampler_list(text: str) -> list[str]:
    from .sampling import SAMPLERS

    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in SAMPLERS or n == "ddpm"]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown or stochastic sampler(s) {', '.join(bad) or text!r}; choose among "
            f"{', '.join(s for s in SAMPLERS if s != 'ddpm')}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported pipeline folder")
    p.add_argument("--out", required=True,
                   help="output folder (sampler_study.md, sampler_study.json, cached reference)")
    p.add_argument("--num", type=int, default=64, help="number of initial noises (images)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: noise i is that of image i of `ffhq-ldm sample --seed`")
    p.add_argument("--steps", type=_int_list, default=",".join(map(str, DEFAULT_STEPS)),
                   metavar="N[,N...]", help="step counts of every sampler (DDIM-50 is always run)")
    p.add_argument("--samplers", type=_sampler_list, default=",".join(STUDY_SAMPLERS),
                   metavar="S[,S...]", help="samplers to measure")
    p.add_argument("--batch-size", type=int, default=None,
                   help="noises per pipeline call (default: all at once)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    """Add ``sampler-study`` to the ``ffhq-ldm`` command line."""
    p = subparsers.add_parser(
        "sampler-study", help="each sampler's error against the converged ODE solution, and its "
                              "images/s, by steps", description=__doc__,
        formatter_class=type("_F", (DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter),
                             {}))
    add_arguments(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Errors

def latent_rmse(a, b) -> float:
    """Root mean square of ``a - b`` over every element (float64 accumulation)."""
    diff = a.double() - b.double()
    return float(diff.pow(2).mean().sqrt())


def psnr_from_rmse(rmse: float, peak: float = 1.0) -> float:
    """PSNR in dB of images in [0, peak] whose RMSE against the reference is ``rmse``."""
    return math.inf if rmse == 0 else 20.0 * math.log10(peak / rmse)


def ends_at_zero(scheduler) -> bool:
    """Whether the sampler's last step goes to noise level 0 (else: timestep 0's level)."""
    from diffusers import DDIMScheduler

    if isinstance(scheduler, DDIMScheduler):
        return bool(scheduler.config.set_alpha_to_one)
    return getattr(scheduler.config, "final_sigmas_type", "zero") == "zero"


def unet_evaluations(scheduler, steps: int) -> int:
    """UNet calls per image of ``steps`` steps (Heun: two per step but the last)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


# ---------------------------------------------------------------------------------------------
# The reference: DDIM over every training timestep, cached

def reference_scheduler(config):
    """DDIM, eta 0, one step per training timestep: T-1, T-2, ..., 0 (``steps_offset=0``).

    The exported "leading" spacing with ``steps_offset=1`` would ask for timestep T, which the
    noise schedule does not have. The last step (0 -> 0) leaves the state unchanged and gives
    the data prediction at timestep 0.
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(config, steps_offset=0, timestep_spacing="leading",
                                          set_alpha_to_one=False)
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    return scheduler


def model_key(model: Path, seed: int, num: int) -> str:
    """A key of what the reference depends on: UNet weights, scheduler config, noises."""
    h = hashlib.sha256()
    for sub in ("unet", "scheduler"):
        for path in sorted((model / sub).glob("*")):
            if path.suffix in (".safetensors", ".json"):
                h.update(path.name.encode())
                with path.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
    h.update(f"seed={seed};num={num};steps={REFERENCE_STEPS}".encode())
    return h.hexdigest()[:16]


def compute_reference(pipe, noise, batch_size: int, progress: bool = True):
    """(state at timestep 0, data prediction there) of the reference solve, on the CPU, fp32."""
    import torch
    from tqdm.auto import tqdm

    device = pipe.unet.device
    at_t0, denoised = [], []
    chunks = noise.split(batch_size)
    scheduler = reference_scheduler(pipe.scheduler.config)
    with torch.no_grad(), tqdm(total=len(chunks) * len(scheduler.timesteps), unit="step",
                               desc=f"reference (DDIM, {len(scheduler.timesteps)} steps)",
                               disable=not progress) as bar:
        for chunk in chunks:
            scheduler = reference_scheduler(pipe.scheduler.config)
            x = chunk.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
            out = None
            for t in scheduler.timesteps:
                eps = pipe.unet(x, t.to(device)).sample
                out = scheduler.step(eps, t, x, eta=0.0)
                x = out.prev_sample
                bar.update(1)
            at_t0.append(x.float().cpu())
            denoised.append(out.pred_original_sample.float().cpu())
    return torch.cat(at_t0), torch.cat(denoised)


def load_or_compute_reference(pipe, noise, cache: Path, key: str, batch_size: int,
                              progress: bool):
    """The reference from ``cache`` when its key matches, else computed and cached there."""
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            stored = (f.metadata() or {}).get("key")
        if stored == key:
            tensors = load_file(str(cache))
            return tensors["at_t0"], tensors["denoised"], True
    at_t0, denoised = compute_reference(pipe, noise, batch_size, progress)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file({"at_t0": at_t0.contiguous(), "denoised": denoised.contiguous()}, str(tmp),
              metadata={"key": key, "device": str(pipe.unet.device)})
    os.replace(tmp, cache)
    return at_t0, denoised, False


# ---------------------------------------------------------------------------------------------
# The sweep

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(pipe, scheduler, steps: int, noise, batch_size: int):
    """Final latents (CPU, fp32), decoded images in [0, 1] (CPU) and seconds of the pipeline
    with ``scheduler`` (which stays the pipeline's)."""
    import torch

    pipe.scheduler = scheduler
    device = pipe.unet.device
    latents, images, seconds = [], [], 0.0
    with torch.no_grad():
        for chunk in noise.split(batch_size):
            _sync(device)
            start = time.perf_counter()
            lat = pipe(latents=chunk.to(device), num_inference_steps=steps, eta=0.0,
                       output_type="latent").images
            decoded = (pipe.decode_latents(lat) / 2 + 0.5).clamp(0, 1)
            _sync(device)
            seconds += time.perf_counter() - start
            latents.append(lat.float().cpu())
            images.append(decoded.cpu())
    return torch.cat(latents), torch.cat(images), seconds


def decode_images(pipe, latents, batch_size: int):
    """Images in [0, 1] of the final latents (as the pipeline decodes them)."""
    import torch

    device = pipe.unet.device
    with torch.no_grad():
        return torch.cat([(pipe.decode_latents(c.to(device)) / 2 + 0.5).clamp(0, 1).cpu()
                          for c in latents.split(batch_size)])


def sweep(pipe, samplers, steps_list, noise, reference, batch_size: int, progress: bool,
          on_row=None):
    """One result row per (sampler, steps): error against ``reference`` and images/s.

    ``reference``: {"at_t0": (latents, images), "zero": (latents, images)}. DDIM-50 runs first,
    then every sampler at the fewest steps, and so on up: a run cut short keeps the rows that
    matter most (``on_row(rows)`` is called after each one).
    """
    from tqdm.auto import tqdm

    from .sampling import make_scheduler

    runs = [(BAR_SAMPLER, BAR_STEPS)]
    runs += [(s, n) for n in steps_list for s in samplers if (s, n) not in runs]
    rows, config = [], pipe.scheduler.config
    for name, steps in tqdm(runs, desc="samplers", unit="run", disable=not progress):
        scheduler = make_scheduler(name, config)
        latents, images, seconds = run_sampler(pipe, scheduler, steps, noise, batch_size)
        endpoint = "zero" if ends_at_zero(scheduler) else "at_t0"
        ref_latents, ref_images = reference[endpoint]
        pixel = latent_rmse(images, ref_images)
        rows.append({"sampler": name, "steps": steps,
                     "unet_evals": unet_evaluations(scheduler, steps), "endpoint": endpoint,
                     "latent_rmse": latent_rmse(latents, ref_latents), "pixel_rmse": pixel,
                     "psnr_db": psnr_from_rmse(pixel), "seconds": seconds,
                     "images_per_s": len(noise) / seconds})
        if on_row is not None:
            on_row(rows)
    return rows


def summarise(rows: list[dict]) -> dict:
    """The bar (DDIM-50's latent error), each sampler's fewest steps within it, the pick.

    The pick is the matching setting with the fewest UNet evaluations (what sets the cost on
    any machine), ties broken by the measured images/s.
    """
    bar = next(r for r in rows if (r["sampler"], r["steps"]) == (BAR_SAMPLER, BAR_STEPS))
    matches = {}
    for name in dict.fromkeys(r["sampler"] for r in rows):
        ok = [r for r in rows if r["sampler"] == name and r["latent_rmse"] <= bar["latent_rmse"]]
        matches[name] = min(ok, key=lambda r: r["steps"]) if ok else None
    found = [r for r in matches.values() if r is not None]
    pick = min(found, key=lambda r: (r["unet_evals"], -r["images_per_s"]))
    return {"bar": bar, "matches": matches, "recommended": pick}


# ---------------------------------------------------------------------------------------------
# Report

def machine_info(device) -> dict:
    import torch

    info = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    info["name"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["cpu_count"] = os.cpu_count()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


def _grid(rows, samplers, steps_list, field: str, fmt: str) -> list[str]:
    lines = ["| steps | " + " | ".join(samplers) + " |", "|---:|" + "---:|" * len(samplers)]
    for n in steps_list:
        cells = []
        for s in samplers:
            r = next((r for r in rows if (r["sampler"], r["steps"]) == (s, n)), None)
            cells.append("" if r is None else format(r[field], fmt))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def markdown(report: dict) -> str:
    rows, samplers = report["rows"], report["samplers"]
    steps_list = sorted({r["steps"] for r in rows})
    m, s = report["machine"], report["summary"]
    lines = [f"Model `{report['model']}` (key {report['key']}); {report['num_noises']} noises "
             f"(seed {report['seed']}); reference: DDIM, eta 0, {REFERENCE_STEPS} steps; "
             f"machine: {m['name']} ({m['device']}, {m['torch_threads']} torch threads"
             + (f", load average {m['load_average'][0]}" if "load_average" in m else "")
             + f"); {report['seconds']:.0f} s in all"
             + (" (reference from the cache)" if report["reference_cached"] else "") + ".", "",
             "Latent RMSE against the reference (lower is better):", ""]
    lines += _grid(rows, samplers, steps_list, "latent_rmse", ".4f")
    lines += ["", "Decoded images, PSNR against the reference's (dB, higher is better):", ""]
    lines += _grid(rows, samplers, steps_list, "psnr_db", ".1f")
    lines += ["", "Images/s (pipeline call and decode, fp32, batch "
              f"{report['batch_size']}, this machine):", ""]
    lines += _grid(rows, samplers, steps_list, "images_per_s", ".3g")
    bar = s["bar"]
    lines += ["", f"Fewest steps matching DDIM-50's latent RMSE ({bar['latent_rmse']:.4f}):", "",
              "| sampler | steps | UNet evals | latent RMSE | PSNR (dB) | images/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, r in s["matches"].items():
        if r is None:
            lines.append(f"| {name} | not within the steps measured | | | | |")
        else:
            lines.append(f"| {name} | {r['steps']} | {r['unet_evals']} | {r['latent_rmse']:.4f}"
                         f" | {r['psnr_db']:.1f} | {r['images_per_s']:.3g} |")
    pick = s["recommended"]
    lines += ["", f"Recommended fast setting: `--sampler {pick['sampler']} --steps "
              f"{pick['steps']}` ({pick['unet_evals']} UNet evaluations per image, against "
              f"{bar['unet_evals']} for DDIM-50).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point

def _check(args) -> Path:
    from .train.options import require_pipeline

    for name in ("num", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    require_pipeline(args.model)
    model = Path(args.model)
    config = model / "scheduler" / "scheduler_config.json"
    if config.is_file():  # before torch loads: "leading" steps_offset 1 would ask for timestep T
        import json

        limit = json.loads(config.read_text()).get("num_train_timesteps", 1000)
        if max([*args.steps, BAR_STEPS]) >= limit:
            raise UsageError(f"--steps must be below the model's {limit} training timesteps, "
                             f"got {max(args.steps)}")
    return model


def run(args) -> int:
    model = _check(args)
    import torch

    from .io import write_json_atomic
    from .sampling import initial_noise, load_pipeline, pick_device

    started = time.perf_counter()
    device = pick_device(args.device)
    pipe = load_pipeline(str(model), "ddim", "fp32", device)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    noise, _ = initial_noise(args.seed, range(args.num), shape)
    batch = args.batch_size or args.num
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = model_key(model, args.seed, args.num)
    at_t0, denoised, cached = load_or_compute_reference(
        pipe, noise, out / "reference_latents.safetensors", key, batch, not args.no_progress)
    reference = {"at_t0": (at_t0, decode_images(pipe, at_t0, batch)),
                 "zero": (denoised, decode_images(pipe, denoised, batch))}
    head = {"model": str(model), "key": key, "num_noises": args.num, "seed": args.seed}

    def partial(rows):
        write_json_atomic(out / "sampler_study.json", {**head, "partial": True, "rows": rows})

    rows = sweep(pipe, args.samplers, args.steps, noise, reference, batch, not args.no_progress,
                 partial)
    report = {"model": str(model), "key": key, "num_noises": args.num, "seed": args.seed,
              "reference": {"sampler": "ddim", "eta": 0.0, "steps": REFERENCE_STEPS},
              "samplers": list(dict.fromkeys([BAR_SAMPLER, *args.samplers])),
              "batch_size": batch, "dtype": "fp32", "machine": machine_info(device),
              "reference_cached": cached, "rows": rows, "summary": summarise(rows),
              "seconds": time.perf_counter() - started, "torch": torch.__version__}
    write_json_atomic(out / "sampler_study.json", report)
    text = markdown(report)
    (out / "sampler_study.md").write_text(text)
    print(text)
    return 0


__all__ = ["STUDY_SAMPLERS", "compute_reference", "latent_rmse", "run", "summarise"]
