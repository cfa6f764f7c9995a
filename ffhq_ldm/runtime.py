"""What a run does when the machine is not the one its settings assume: a CPU without CUDA.

``accelerate_config.yaml`` asks for bf16 mixed precision, which is right on a GPU. On a CPU,
torch's bf16 autocast runs the convolutions through bf16 kernels that most CPUs have no matrix
units for: slower than fp32 and less precise. So a training run that lands on a CPU with a
bf16 config trains in fp32 and says so in one line (``configs/accelerate/cpu.yaml``
asks for fp32 itself and gets no note); ``ffhq-ldm sample --dtype bf16`` or ``fp16`` on a CPU
samples as asked, after a one-line warning.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

_TRUE = ("1", "true", "yes")


def accelerator_on_cpu(env: dict | None = None) -> bool:
    """Whether ``accelerate`` will put this process on the CPU: asked to (``use_cpu: true`` in
    the config, passed on as ACCELERATE_USE_CPU), or no CUDA, MPS or XPU device is present."""
    env = os.environ if env is None else env
    if str(env.get("ACCELERATE_USE_CPU", "")).lower() in _TRUE:
        return True
    if torch.cuda.is_available():
        return False
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return False
    xpu = getattr(torch, "xpu", None)
    return not (xpu is not None and xpu.is_available())


def training_mixed_precision(env: dict | None = None, on_cpu: bool | None = None,
                             quiet: bool = False) -> str | None:
    """The ``mixed_precision`` argument for ``Accelerator``: None (the config decides) unless
    the config asks for bf16 and the run is on a CPU; then "no" (fp32), with a note on stderr
    from the first process.

    Trainers call it as ``Accelerator(mixed_precision=training_mixed_precision(), ...)``.
    """
    env = os.environ if env is None else env
    asked = str(env.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if asked != "bf16":  # fp16 is left to the trainers, which refuse it where it overflows
        return None
    if not (accelerator_on_cpu(env) if on_cpu is None else on_cpu):
        return None
    if not quiet and str(env.get("RANK", env.get("LOCAL_RANK", "0"))) == "0":
        print(f"note: no GPU: training in fp32, not the accelerate config's {asked} (slower "
              "and less precise on a CPU); configs/accelerate/cpu.yaml asks for fp32 itself",
              file=sys.stderr)
    return "no"


def cpu_dtype_warning(device, dtype: str) -> str | None:
    """A one-line warning for sampling in bf16/fp16 on a CPU (much slower than fp32 there:
    few CPUs have bf16 or fp16 matrix units); None where the choice is sensible."""
    if torch.device(device).type != "cpu" or dtype not in ("bf16", "fp16"):
        return None
    return (f"warning: --dtype {dtype} on a CPU is usually much slower than fp32 (few CPUs "
            "compute it natively); --dtype auto picks fp32 here")


@contextlib.contextmanager
def diffusers_progress(enabled: bool):
    """diffusers' own progress bars (e.g. "Loading pipeline components") on or off inside the
    block, restored afterwards."""
    from diffusers.utils import logging as dlogging

    was_enabled = dlogging.is_progress_bar_enabled()
    if enabled:
        dlogging.enable_progress_bar()
    else:
        dlogging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            dlogging.enable_progress_bar()
        else:
            dlogging.disable_progress_bar()
