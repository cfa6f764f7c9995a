"""What a run does when the machine is not the one its settings assume: a CPU without CUDA.

``accelerate_config.yaml`` asks for bf16 mixed precision, which is right on a GPU. On a CPU,
torch's bf16 autocast runs the convolutions through bf16 kernels that most CPUs have no matrix
units for: slower than fp32 and less precise. So a training run that lands on a CPU with a
bf16 config trains in fp32 and says so in one line (``configs/accelerate/cpu.yaml``
asks for fp32 itself and gets no note); ``ffhq-ldm sample --dtype bf16`` or ``fp16`` on a CPU
samples as asked, after a one-line warning.

CPUs with native bf16 (AVX512-BF16 or AMX, as oneDNN reports) are the exception: there bf16
autocast is faster than fp32 (the demo's autoencoder step: 12.9 vs 9.4 img/s on a 2-core AMD
EPYC with AVX512-BF16). A config made for the CPU that asks for bf16
(``configs/accelerate/cpu_bf16.yaml``, what ``make demo`` uses) gets it on such a CPU, and fp32
with the note elsewhere.
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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def training_mixed_precision(env: dict | None = None, on_cpu: bool | None = None,
                             quiet: bool = False, native_bf16: bool | None = None) -> str | None:
    """The ``mixed_precision`` argument for ``Accelerator``: None (the config decides) unless
    the config asks for bf16 and the run is on a CPU; then "no" (fp32), with a note on stderr
    from the first process, except for a CPU config (``use_cpu: true``) on a CPU with native
    bf16, which keeps bf16.

    Trainers call it as ``Accelerator(mixed_precision=training_mixed_precision(), ...)``.
    """
    env = os.environ if env is None else env
    asked = str(env.get("ACCELERATE_MIXED_PRECISION", "no")).lower()
    if asked != "bf16":  # fp16 is left to the trainers, which refuse it where it overflows
        return None
    if not (accelerator_on_cpu(env) if on_cpu is None else on_cpu):
        return None
    cpu_config = str(env.get("ACCELERATE_USE_CPU", "")).lower() in _TRUE
    if cpu_config and (cpu_has_native_bf16() if native_bf16 is None else native_bf16):
        return None  # a CPU config asking for bf16, on a CPU that computes it natively
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


class CpuThreads:
    """Keeps torch's intra-op thread count on a CPU at what other processes leave free.

    On a shared CPU, a thread that loses its core stalls every parallel region until it is
    scheduled again, so two threads on two cores that other programs also want run several
    times slower than one (the demo's autoencoder with two busy-loop processes beside it: 1.8
    img/s with 2 threads, 4.8 with 1; docs/demo.md). Every ``every_s`` seconds this measures how
    many cores other processes kept busy (the machine's busy time minus this process's and its
    children's) and sets ``threads = clamp(cores - busy elsewhere, 1, the count it started
    with)``; a change needs the same answer twice in a row. It never raises the count above
    what the launcher chose (``--num_cpu_threads_per_process``), and does nothing on a GPU or
    with one thread.
    """

    def __init__(self, device, every_s: float = 15.0, say=None):
        import time

        import psutil

        self._psutil, self._time = psutil, time
        self.limit = torch.get_num_threads()
        self.enabled = torch.device(device).type == "cpu" and self.limit > 1
        self.every_s, self.say = every_s, say
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            psutil.cpu_count() or 1)
        self._pending: int | None = None
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        """(wall time, busy CPU seconds of the machine, CPU seconds of this process tree)."""
        t = self._psutil.cpu_times()
        busy = t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(
            t, "softirq", 0.0)
        me = self._psutil.Process()
        own = sum(sum(p.cpu_times()[:2]) for p in [me, *self._children(me)])
        return self._time.monotonic(), busy, own

    def _children(self, me) -> list:
        try:
            return me.children(recursive=True)
        except self._psutil.Error:
            return []

    @staticmethod
    def choose(cores: int, busy_elsewhere: float, limit: int) -> int:
        return max(1, min(limit, int(cores - busy_elsewhere + 0.5)))

    def update(self) -> int | None:
        """Re-measure when ``every_s`` has passed; the new thread count when it changed."""
        if not self.enabled or self._time.monotonic() - self._last[0] < self.every_s:
            return None
        now = self._sample()
        wall = max(now[0] - self._last[0], 1e-6)
        elsewhere = max(0.0, ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall)
        self._last = now
        want = self.choose(self.cores, elsewhere, self.limit)
        if want == torch.get_num_threads():
            self._pending = None
            return None
        if self._pending != want:  # the same answer twice before changing
            self._pending = want
            return None
        self._pending = None
        torch.set_num_threads(want)
        if self.say is not None:
            self.say(f"note: other processes keep {elsewhere:.1f} of {self.cores} cores busy: "
                     f"training with {want} thread{'s' if want > 1 else ''} "
                     f"(at most {self.limit})")
        return want
