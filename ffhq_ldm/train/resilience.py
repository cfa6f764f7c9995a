"""Nothing lost, nothing crashes: graceful stop on SIGTERM/SIGINT, the non-finite guard, and
the two ways out of a training loop (preempted: exit 75; non-finite: exit 2).

- **Preemption** (SIGTERM/SIGINT) saves a checkpoint at the next step boundary and exits with
  ``EXIT_PREEMPTED``; rerunning the same command continues.
- **Non-finite losses** skip the update; ``max_in_row`` of them in a row stop the run (exit 2).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .. import cli_common
from .checkpoints import latest_checkpoint

# Exit code of a run stopped by SIGTERM/SIGINT after saving its checkpoint: sysexits.h
# EX_TEMPFAIL, "temporary failure, retry". Not 0, so that `until train ...; do :; done`,
# Kubernetes' restartPolicy=OnFailure or a Makefile treat the run as unfinished.
EXIT_PREEMPTED = cli_common.EXIT_PREEMPTED  # 75
EXIT_NONFINITE = 2
# Test hook (tests/test_resilience.py): send this process a real signal after step N.
TEST_SIGNAL_ENV = "_FACELDM_TEST_SIGNAL_AT_STEP"


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

    def __enter__(self) -> GracefulStop:
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


def exit_nonfinite(accelerator, guard: NonFiniteGuard, output_dir: Path, step: int) -> int:
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
