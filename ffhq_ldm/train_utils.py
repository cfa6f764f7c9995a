"""Pieces both trainers share: EMA, exact resume, preemption, the non-finite guard, samplers,
logging helpers. The checkpoint format (saving, loading, listing, pruning, resuming) is in
``checkpoints``.

A 72-hour run that dies at hour 70 must lose minutes, not days:

- **Checkpoints** are safetensors + JSON, never pickles, and never half-visible: see
  ``checkpoints``.
- **Resume is exact.** Besides the state a checkpoint holds, every step reseeds the global RNG
  from (seed, step, rank), so nothing that touches the global RNG between steps (data loader
  iterators, previews, evaluation) can make a resumed run diverge from an uninterrupted one.
- **Preemption** (SIGTERM/SIGINT) saves a checkpoint at the next step boundary and exits with
  ``EXIT_PREEMPTED``; rerunning the same command continues.
- **Non-finite losses** skip the update; ``max_in_row`` of them in a row stop the run (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoints import latest_checkpoint
from .cli_common import UsageError

# Exit code of a run stopped by SIGTERM/SIGINT after saving its checkpoint: sysexits.h
# EX_TEMPFAIL, "temporary failure, retry". Not 0, so that `until train ...; do :; done`,
# Kubernetes' restartPolicy=OnFailure or a Makefile treat the run as unfinished.
EXIT_PREEMPTED = 75
EXIT_NONFINITE = 2
# Test hook (tests/test_resilience.py): send this process a real signal after step N.
TEST_SIGNAL_ENV = "_FACELDM_TEST_SIGNAL_AT_STEP"


# ---------------------------------------------------------------------------------------------
# EMA of the weights (fp32 shadow), with LDM's warm-up (LitEma): the m-th update (m = 1, 2, ...)
# uses decay_m = min(decay, (1 + m) / (10 + m)), so early weights are not frozen in.

class EMA:
    """Exponential moving average of a model's parameters, kept in fp32.

    ``update(model)`` decides on the host. ``update(model, enabled=tensor)`` decides on the
    device (the non-finite guard's flag): the update count lives in a device tensor then, so a
    skipped update costs no host-device sync; ``num_updates`` reads it back (a sync, rarely).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]
        self._calls = 0  # update() calls
        self._skipped = None  # device tensor: calls whose device-side flag said "skip"

    @property
    def num_updates(self) -> int:
        skipped = 0 if self._skipped is None else int(self._skipped.item())
        return self._calls - skipped

    @num_updates.setter
    def num_updates(self, value: int) -> None:
        self._calls, self._skipped = int(value), None

    def current_decay(self) -> float:
        """The decay the next update will use."""
        m = self.num_updates + 1
        return min(self.decay, (1 + m) / (10 + m)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, enabled: bool | torch.Tensor = True) -> None:
        """One EMA step; call it only after an optimizer step (gradients synchronised)."""
        if enabled is False:
            return
        params = [p.detach().float() for p in model.parameters()]
        if enabled is True:
            decay = self.current_decay()
            # shadow <- shadow + (1 - decay) * (param - shadow), one fused kernel per dtype group
            torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
            self._calls += 1
            return
        # Device-side gate: weight 0 leaves the shadow's values unchanged. A 0-dim tensor
        # passed as lerp's scalar weight would be read back (.item()), so multiply instead.
        device = self.shadow[0].device
        ok = enabled.to(device=device, dtype=torch.float32)
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float32, device=device)
        if self.warmup:
            m = (self._calls + 1) - self._skipped
            decay = torch.clamp((1 + m) / (10 + m), max=self.decay)
        else:
            decay = torch.full((), self.decay, device=device)
        weight = (1.0 - decay) * ok
        torch._foreach_mul_(self.shadow, 1.0 - weight)
        torch._foreach_add_(self.shadow, torch._foreach_mul(params, weight))
        self._calls += 1
        self._skipped += 1.0 - ok

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for shadow, p in zip(self.shadow, model.parameters()):
            p.copy_(shadow.to(p.dtype))

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        if self._skipped is not None:
            self._skipped = self._skipped.to(device)
        return self

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates,
                "decay": self.decay}

    def save(self, path: Path) -> None:
        tensors = {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        save_file(tensors, str(path), metadata={"num_updates": str(self.num_updates),
                                                 "decay": str(self.decay)})

    def load(self, path: Path) -> None:
        tensors = load_file(str(path))
        if set(tensors) != set(self.names):
            raise ValueError(f"EMA file {path} does not match the model's parameters")
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [tensors[n].to(device) for n in self.names]
        with safe_open(str(path), "pt") as f:
            self.num_updates = int(f.metadata()["num_updates"])


# ---------------------------------------------------------------------------------------------
# Randomness: per-step seeds (the RNG state a checkpoint holds: ``checkpoints.capture_rng``)

def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (seed, step, rank), unrelated to ``draw_global_batch``'s seeds."""
    digest = hashlib.sha256(f"faceldm-global-rng/{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's global RNGs (CPU and accelerators) for this step: the posterior samples
    and dropout masks of step s are a function of (seed, s, rank) alone."""
    torch.manual_seed(step_seed(seed, step, rank))


def check_process_group(accelerator) -> None:
    """Refuse processes that were launched together but did not join one process group.

    ``accelerate launch`` with several processes on a machine without GPUs (and without
    ACCELERATE_USE_CPU=1) starts them, but each one then runs alone as process 0 of 1: N
    independent trainings writing into the same output folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(
            f"{launched} processes were launched but accelerate joined "
            f"{accelerator.num_processes}: they would train separately into one folder. On a "
            f"machine without GPUs set ACCELERATE_USE_CPU=1 (configs/accelerate/cpu_2proc.yaml)")


# ---------------------------------------------------------------------------------------------
# Preemption: SIGTERM/SIGINT -> checkpoint at the next step boundary -> EXIT_PREEMPTED

class GracefulStop:
    """Turns SIGTERM and SIGINT into a request to stop at the next step boundary.

    A second signal aborts at once (SIGINT: KeyboardInterrupt, exit 130; SIGTERM: the default
    action). With several processes the ranks agree every ``sync_every`` steps (an all-reduce),
    so they all save the same step; a single process checks a Python flag every step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator, sync_every: int = 10):
        self.accelerator, self.sync_every = accelerator, sync_every
        self.received: int | None = None
        self._previous: dict = {}
        test_step = os.environ.get(TEST_SIGNAL_ENV, "")
        self._test_step = int(test_step) if test_step.isdigit() else None
        self._test_signal = getattr(signal, os.environ.get(TEST_SIGNAL_ENV + "_SIGNAL", "SIGTERM"))

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step, "
              "then exiting (send it again to stop at once, without saving)", file=sys.stderr,
              flush=True)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal"

    def should_stop(self, step: int) -> bool:
        if self._test_step is not None and step == self._test_step and self.received is None:
            os.kill(os.getpid(), self._test_signal)  # a real signal, through the real handler
            deadline = time.monotonic() + 5
            while self.received is None and time.monotonic() < deadline:
                time.sleep(0.001)
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if step % self.sync_every:
            return False
        flag = torch.tensor(float(self.received is not None), device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0


def preempted_message(stop: GracefulStop, step: int, checkpoint: Path) -> str:
    return (f"stopped by {stop.signal_name} at step {step}; checkpoint {checkpoint}. "
            f"Rerun the same command to continue from it (exit code {EXIT_PREEMPTED}).")


def exit_preempted(accelerator, stop: GracefulStop, output_dir: Path, step: int,
                   saved_at: int | None, checkpoint, bar=None) -> int:
    """A trainer's way out after a stop signal: a checkpoint of ``step`` (``checkpoint()``, on
    every process; skipped when ``saved_at`` is this step), the one-line message on how to
    continue, and ``EXIT_PREEMPTED`` for ``main`` to return."""
    path = checkpoint() if saved_at != step else latest_checkpoint(output_dir)
    if bar is not None:
        bar.close()
    if accelerator.is_main_process:
        print(preempted_message(stop, step, path), file=sys.stderr)
    accelerator.end_training()
    return EXIT_PREEMPTED


def exit_nonfinite(accelerator, guard: "NonFiniteGuard", output_dir: Path, step: int) -> int:
    """A trainer's way out after too many non-finite steps in a row: the message (which names
    the last good checkpoint) and ``EXIT_NONFINITE`` for ``main`` to return."""
    if accelerator.is_main_process:
        print(guard.stop_message(step, latest_checkpoint(output_dir)), file=sys.stderr)
    accelerator.end_training()
    return EXIT_NONFINITE


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a SIGINT/SIGTERM sent to the whole process group (Ctrl-C,
    a scheduler) must not kill the workers while the main process finishes its step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# Non-finite guard: skip the update, count, stop after too many in a row

def fused_supported(device) -> bool:
    """Whether torch's fused Adam/AdamW runs on this device type (it can skip on a device flag)."""
    return torch.device(device).type in ("cuda", "cpu", "mps", "xpu")


class NonFiniteGuard:
    """Skips updates whose loss (or gradient norm) is not finite, counts them, and says when
    ``max_in_row`` came in a row.

    Two modes, chosen per run:
    - ``deferred`` (fused optimizer, no GradScaler): the flag never leaves the device. The
      fused Adam/AdamW kernel reads it as ``found_inf`` (the mechanism torch's GradScaler uses:
      parameters, moments and step count stay untouched), the EMA weight is multiplied by it,
      and the counters are device tensors read back by ``poll`` at log and checkpoint steps.
      No host-device sync per step; a run of bad steps is noticed at the next poll, which is
      harmless because each of those updates was skipped.
    - host: ``step`` reads the flag back every step (one sync; with a GradScaler, accelerate
      already syncs every step to learn whether the scaler skipped).
    """

    def __init__(self, max_in_row: int, device, deferred: bool, reduce=None, write=None):
        self.max_in_row, self.deferred, self.device = max_in_row, deferred, torch.device(device)
        self.reduce = reduce  # sums a device tensor over processes (None: one process)
        self.write = write or (lambda text: print(text, file=sys.stderr, flush=True))
        self.total, self.run, self.worst = 0, 0, 0  # as of the last poll (host)
        zeros = lambda: torch.zeros((), dtype=torch.float32, device=self.device)  # noqa: E731
        self._total, self._run, self._worst = zeros(), zeros(), zeros()
        self._polled_total, self._polled_step = 0, 0

    def flag(self, *values) -> torch.Tensor:
        """Device bool: True when any of ``values`` is not finite (on any process)."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for value in values:
            if value is not None:
                bad = bad | ~torch.isfinite(value.detach()).all()
        if self.reduce is not None:
            bad = self.reduce(bad.float()) > 0
        return bad

    def step(self, optimizer, bad: torch.Tensor):
        """Optimizer step unless ``bad``; gradients are zeroed either way.

        Returns what ``EMA.update(enabled=...)`` wants: a device tensor (deferred) or a bool.
        """
        if self.deferred:
            inner = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
            inner.found_inf = bad.float()
            try:
                optimizer.step()
            finally:
                del inner.found_inf
            ok = ~bad
        else:
            ok = not bool(bad)
            if ok:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ok

    def record(self, bad, step: int) -> None:
        """Count step ``step``'s outcome (``bad``: device tensor or bool)."""
        if self.deferred:
            bad = bad.float()
            self._total += bad
            self._run = (self._run + 1) * bad
            self._worst = torch.maximum(self._worst, self._run)
            return
        if bad:
            self.total, self.run = self.total + 1, self.run + 1
            self.worst = max(self.worst, self.run)
            self.write(f"step {step}: loss not finite, update skipped ({self.run} in a row, "
                       f"{self.total} in all)")
        else:
            self.run = 0

    def poll(self, step: int) -> bool:
        """Read the counters (deferred: one sync); True when the run must stop."""
        if self.deferred:
            total, run, worst = (int(v) for v in torch.stack(
                [self._total, self._run, self._worst]).tolist())
            if total > self._polled_total:
                self.write(f"steps {self._polled_step + 1}-{step}: "
                           f"{total - self._polled_total} update(s) skipped, loss not finite "
                           f"({total} in all)")
            self.total, self.run, self.worst = total, run, worst
            self._worst.copy_(self._run)  # a later poll judges the streaks after this one
            self._polled_total, self._polled_step = total, step
            return worst >= self.max_in_row
        return self.run >= self.max_in_row

    def state_dict(self) -> dict:
        if self.deferred:
            self.total, self.run = (int(v) for v in torch.stack([self._total, self._run]).tolist())
        return {"total": self.total, "run": self.run}

    def load_state_dict(self, state: dict, step: int = 0) -> None:
        self.total, self.run = int(state.get("total", 0)), int(state.get("run", 0))
        self.worst = self.run
        self._total.fill_(self.total)
        self._run.fill_(self.run)
        self._worst.fill_(self.run)
        self._polled_total, self._polled_step = self.total, step

    def stop_message(self, step: int, checkpoint: Path | None) -> str:
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else \
            "no checkpoint was saved"
        return (f"error: stopped at step {step}: the loss was not finite for "
                f"{max(self.worst, self.run)} steps in a row (limit --max-nonfinite "
                f"{self.max_in_row}; {self.total} skipped in all); {where}. Lower the learning "
                f"rate, check the data, or raise --max-nonfinite, then rerun")


# ---------------------------------------------------------------------------------------------
# Data order that depends only on (seed, epoch): exact and cheap to resume mid-epoch.

class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices per epoch, each paired with a flip bit: yields ``i + n * flip``.

    The order is a function of (seed, epoch) only, so resuming at (epoch, offset) replays
    exactly the batches an uninterrupted run would have seen, without iterating through them.
    """

    def __init__(self, n: int, seed: int, flip: bool = True):
        self.n, self.seed, self.flip = n, seed, flip
        self.epoch, self.offset = 0, 0

    def set_position(self, epoch: int, offset: int) -> None:
        self.epoch, self.offset = epoch, offset

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.flip:
            perm = perm + self.n * torch.randint(0, 2, (self.n,), generator=g)
        return perm

    def __iter__(self):
        order = self.order(self.epoch)[self.offset:]
        self.offset = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n - self.offset


# ---------------------------------------------------------------------------------------------
# Logging helpers

class Throughput:
    """Images per second over a sliding window of steps (host time, no device sync)."""

    def __init__(self):
        self.t0, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def rate(self, reset: bool = True) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.t0, 1e-9)
        if reset:
            self.t0, self.images = now, 0
        return rate


def write_json_atomic(path: Path, payload) -> None:
    """Write JSON to a temporary name, then rename: a reader (or a resume) never sees half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def read_json_or(path: Path, default):
    """JSON from ``path``, or ``default`` when it is missing or damaged."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return default


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint a run resumes from), so the
    log reads as one uninterrupted run."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def device_memory(device) -> dict:
    """Peak accelerator memory in GB for the logs (empty on a CPU, where torch does not track it)."""
    if torch.device(device).type == "cuda":
        return {"gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {}


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line per log event: the machine-readable twin of the TensorBoard scalars."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def scalars(logs: dict) -> dict:
    """Tensors to Python floats for trackers and progress bars (one host sync, done rarely)."""
    out = {}
    for k, v in logs.items():
        out[k] = float(v.item() if torch.is_tensor(v) else v)
    return out


def finite_or_none(value: float):
    """JSON has no NaN: a non-finite logged value is written as null."""
    return value if math.isfinite(value) else None


def warmup_lambda(warmup: int):
    """Linear warm-up to the base LR, then constant (LDM keeps the LR constant)."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup))
    return factor
