"""The one sampling road: load an exported pipeline, pick its sampler, draw images, write them.

``ffhq-ldm sample``, ``ffhq-ldm evaluate calc --model``, the UNet trainer's previews and
``ffhq-ldm bench`` all draw through ``sample_images``. Image ``i`` of a seed starts from its own
noise, drawn by a CPU generator seeded with ``mix_seed(seed, i)``, so it is the same image
whatever the batch size, the device or the command that drew it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cli_common import UsageError
from .config import mix_seed

# Samplers by name: DDIM is the paper's (LDM's settings live in the exported scheduler config).
# "dpm++" is DPM-Solver++ of order 3 (3M), "dpm++2m" the second-order multistep variant.
SAMPLERS = ("ddim", "ddpm", "dpm++", "dpm++2m", "unipc", "euler", "heun")
DTYPES = ("fp32", "bf16", "fp16")


def pick_device(name: str):
    """``auto``: CUDA, else Apple's MPS, else the CPU; any other name as torch spells it."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible to PyTorch")
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_scheduler(name: str, config):
    """A scheduler of kind ``name`` built from an exported pipeline's scheduler config."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "ddpm":
        return DDPMScheduler.from_config(config, variance_type="fixed_small")
    if name == "dpm++":
        # DPM-Solver++ (Lu et al. 2022); order 3 suits unconditional sampling.
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                       solver_order=3)
    if name == "dpm++2m":
        # DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), midpoint form.
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++",
                                                       solver_order=2)
    if name == "unipc":
        # UniPC (Zhao et al. 2023): order-2 predictor with its corrector, data prediction, B2(h).
        return UniPCMultistepScheduler.from_config(config, solver_order=2, predict_x0=True)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "heun":
        # Heun's second-order method (Karras et al. 2022, Algorithm 1): two UNet calls per step
        # but the last, so N steps cost 2N - 1 UNet evaluations.
        return HeunDiscreteScheduler.from_config(config)
    raise UsageError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def load_pipeline(model: str, sampler: str = "ddim", dtype: str = "fp32", device="cpu"):
    """Load an exported FaceLDMPipeline folder with the chosen sampler, dtype and device."""
    import torch

    from pipelines.pipeline_face_ldm import FaceLDMPipeline

    from .models.export_checks import check_pipeline_folder
    from .train.options import require_pipeline

    require_pipeline(model)  # also puts back a MODEL.old that a killed export left
    path = Path(model)
    check_pipeline_folder(path)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        pipe = FaceLDMPipeline.from_pretrained(path, use_safetensors=True)
    except OSError as exc:
        raise UsageError(f"{model}: {exc} (pickled weights are refused: they can run code when "
                         "loaded)") from None
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    # The VAE decodes in fp32 unless bf16 was asked for (fp16 VAEs overflow).
    vae_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for module, want in ((pipe.unet, torch_dtype), (pipe.vae, vae_dtype)):
        # Cast only when needed: diffusers warns on every .to(dtype), even a no-op one.
        module.to(device=device, **({"dtype": want} if module.dtype != want else {}))
    return pipe


def initial_noise(seed: int, indices, shape: tuple[int, ...]):
    """The starting latents of images ``indices`` of ``seed``: one CPU generator per image."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(mix_seed(seed, i)) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


def sample_images(pipe, num: int, *, seed: int = 0, steps: int = 50, eta: float = 0.0,
                  batch_size: int = 16, fixed_batch: bool = False, progress: bool = True,
                  desc: str = "sampling") -> Iterator[tuple[int, object]]:
    """Draw images ``0 .. num-1`` of ``seed``; yields ``(first index, uint8 array (n, H, W, 3))``.

    ``fixed_batch``: every call runs at ``batch_size`` (a short last batch is filled with the
    next indices' images, which are dropped), so a compiled UNet with static shapes never
    recompiles. The images do not depend on it, nor on ``batch_size``.
    """
    import numpy as np
    from tqdm.auto import tqdm

    config = pipe.unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    with tqdm(total=num, desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            drawn = batch_size if fixed_batch else n
            latents, gens = initial_noise(seed, range(start, start + drawn), shape)
            images = pipe(batch_size=drawn, num_inference_steps=steps, generator=gens, eta=eta,
                          latents=latents, output_type="np").images
            yield start, np.clip(np.rint(np.asarray(images[:n]) * 255.0), 0, 255).astype(np.uint8)
            bar.update(n)


def compile_for_sampling(pipe, compiled: bool, mode: str | None = None,
                         backend: str = "inductor") -> None:
    """Compile the pipeline's UNet and VAE decoder in place when ``compiled`` (static shapes).

    ``pipe.unet`` and ``pipe.vae`` keep their types and state_dict keys. The decoder is
    compiled without ``mode``: CUDA-graph replays ("reduce-overhead") reuse their output
    buffers, and ``decode_latents`` keeps each chunk's output until all are decoded. Decode
    chunks have one size but the last, so a decoder compiles at most twice per batch size.
    """
    from .speed import maybe_compile

    maybe_compile(pipe.unet, enabled=compiled, mode=mode, backend=backend, in_place=True)
    maybe_compile(pipe.vae.decoder, enabled=compiled, backend=backend, in_place=True)


class PngWriter:
    """Write uint8 images as PNG files on background threads, while the next batch samples.

    ``write(path, array)`` returns at once; it blocks only while ``max_pending`` images wait to
    be written, so memory stays flat however many images are drawn. A failed write is raised
    (as ``UsageError`` for an OS error: an unwritable or missing folder, a full disk) by the
    next ``write`` or by ``close``, and the images still queued are dropped. ``close`` (or
    leaving a ``with`` block) waits until every file is on disk. The files are those of
    ``Image.fromarray(array).save(path)``, byte for byte.
    """

    def __init__(self, workers: int = 4, max_pending: int = 64):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers),
                                        thread_name_prefix="png-writer")
        self._slots = threading.BoundedSemaphore(max(1, max_pending))
        self._lock = threading.Lock()
        self._failure: tuple[Path, BaseException] | None = None
        self.written: list[Path] = []

    def _save(self, path: Path, array) -> None:
        from PIL import Image

        try:
            if self._failure is None:  # after a failure the queued images are dropped
                Image.fromarray(array).save(path)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            with self._lock:
                if self._failure is None:
                    self._failure = (path, exc)
        finally:
            self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is None:
            return
        path, exc = self._failure
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise exc

    def write(self, path, array) -> None:
        """Queue ``array`` (uint8, (H, W, 3)) to be written to ``path``."""
        import numpy as np

        self._raise_failure()
        self._slots.acquire()
        try:
            self._pool.submit(self._save, Path(path), np.array(array, dtype=np.uint8))
        except BaseException:
            self._slots.release()
            raise
        self.written.append(Path(path))

    def close(self) -> None:
        """Wait for every queued file; raise the first failed write."""
        self._pool.shutdown(wait=True)
        self._raise_failure()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error comes first: drop what is queued, keep it
            self._pool.shutdown(wait=True, cancel_futures=True)
