"""What both trainers do around their step: per-step seeds, the process-group check, the
replayable data order, throughput and log values, the LR warm-up.

**Resume is exact.** Besides the state a checkpoint holds, every step reseeds the global RNG
from (seed, step, rank), so nothing that touches the global RNG between steps (data loader
iterators, previews, evaluation) can make a resumed run diverge from an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..cli_common import UsageError
from ..config import mix_seed

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
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
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


def device_memory(device) -> dict:
    """Peak accelerator memory in GB for the logs (empty on a CPU: torch does not track it)."""
    if torch.device(device).type == "cuda":
        return {"gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {}


def scalars(logs: dict) -> dict:
    """Tensors to Python floats for trackers and progress bars (one host sync, done rarely)."""
    out = {}
    for k, v in logs.items():
        out[k] = float(v.item() if torch.is_tensor(v) else v)
    return out


def finite_or_none(value: float):
    """JSON has no NaN: a non-finite logged value is written as null."""
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# One training run: the accelerator, the output folder, resume and lineage, and the loop's
# cadence (log, non-finite stop, checkpoint, preemption). Both trainers run through it.

class Run:
    """The bookkeeping of one training run, shared by both trainers.

    ``Run(trainer, args, config)`` makes the accelerator (mixed precision and process count come
    from accelerate's config alone), seeds, and turns on the CUDA fast-math settings. Then the
    trainer builds its models, calls ``resume`` (exact: weights, optimisers, schedulers, EMA,
    RNG, counters), ``save_config``, and ``loop``.
    """

    def __init__(self, trainer: str, args, config, may_change: tuple[str, ...]):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from ..runtime import training_mixed_precision
        from ..speed import enable_cudnn_autotune, enable_tf32

        self.trainer, self.args, self.config, self.may_change = trainer, args, config, may_change
        self.out = Path(args.output_dir)
        # bf16 asked for on a machine without a GPU: fp32, with a note (ffhq_ldm.runtime)
        self.accelerator = Accelerator(log_with=None if args.log_with == "none" else args.log_with,
                                       project_dir=str(self.out),
                                       mixed_precision=training_mixed_precision())
        check_process_group(self.accelerator)
        self.main = self.accelerator.is_main_process
        if self.main:  # before anything is read or cleaned in the folder
            from .lock import lock_folder

            self.lock = lock_folder(self.out)
        set_seed(config.seed)
        enable_tf32()  # what bf16 autocast leaves in fp32 runs on tensor cores too
        enable_cudnn_autotune()  # one input shape for the whole run: pick conv kernels once
        self.device, self.procs = self.accelerator.device, self.accelerator.num_processes
        self.step = self.images_seen = 0
        self.resumed_from: Path | None = None
        self.lineage: list[Path] = []
        self.last_saved: int | None = None

    def print(self, text: str) -> None:
        self.accelerator.print(text)

    def warn(self, text: str) -> None:
        """One line on stderr, from the main process."""
        if self.main:
            print(text, file=sys.stderr, flush=True)

    def write_scan_report(self, report) -> None:
        """``OUTPUT/skipped_files.json`` and the data line (main process)."""
        if report is None or not self.main:
            return
        path = self.out / "skipped_files.json"
        report.write(path)
        self.print(f"data: {report.summary()}" + (f"; see {path}" if report.exit_code() else ""))

    def resume(self, run_facts: dict, *, models: dict, optimizers: dict, guard,
               schedulers: dict | None = None, ema=None) -> dict | None:
        """Continue from ``--resume`` (default: the latest checkpoint): returns its trainer
        state, or None for a fresh run. Refuses a checkpoint of other settings in one line."""
        from ..io import truncate_jsonl
        from .checkpoints import (
            check_resumable,
            checkpoint_lineage,
            choose_checkpoint,
            clean_stale,
            list_checkpoints,
            load_checkpoint,
        )

        self.run_facts = run_facts
        if self.main:
            clean_stale(self.out)  # the hidden leftovers of a crash in the middle of a save
        chosen = choose_checkpoint(self.out, self.args.resume, self.warn)
        self.resumed_from, state = chosen if chosen is not None else (None, None)
        if self.resumed_from is not None:
            check_resumable(state, self.resumed_from, self.trainer, type(self.config),
                            self.config, run_facts, self.may_change)
            load_checkpoint(self.accelerator, self.resumed_from, models=models,
                            optimizers=optimizers, schedulers=schedulers or {}, ema=ema,
                            state=state)
            self.step, self.images_seen = state["step"], state["images_seen"]
            self.last_saved = self.step
            guard.load_state_dict(state.get("nonfinite", {}), self.step)
            self.print(f"resumed from {self.resumed_from} at step {self.step}")
            saved_precision = state.get("mixed_precision")
            if saved_precision and saved_precision != self.accelerator.mixed_precision:
                # allowed (another machine may lack bf16), but no longer bit-exact
                self.warn(f"note: {self.resumed_from} was trained with mixed precision "
                          f"{saved_precision}, this run uses {self.accelerator.mixed_precision}: "
                          "it continues, but not bit-identically to an uninterrupted run")
        if self.main:  # log lines past the step resumed from (0 when fresh) were never saved
            truncate_jsonl(self.out / "log.jsonl", self.step)
        self.lineage = checkpoint_lineage(self.out, self.resumed_from, self.step)
        if len(self.lineage) < len(list_checkpoints(self.out)):
            self.print(f"note: the other checkpoints in {self.out / 'checkpoints'} are not this "
                       "run's; its first save replaces them")
        return state

    def save_config(self, **run) -> None:
        """``OUTPUT/config.json``: the resolved config and the run's facts; starts the trackers."""
        from ..config import save_run_config

        if self.main:
            save_run_config(self.out / "config.json", **{self.trainer: self.config}, run={
                "preset": self.args.preset, "data": self.args.data, "output_dir": str(self.out),
                "num_processes": self.procs,
                "mixed_precision": self.accelerator.mixed_precision, **run})
        if self.accelerator.log_with:
            self.accelerator.init_trackers(f"train_{self.trainer}")

    def save_checkpoint(self, state: dict, **parts) -> Path:
        """A complete checkpoint of this step (every process takes part)."""
        from ..config import to_dict
        from .checkpoints import save_checkpoint

        state = {"trainer": self.trainer, "images_seen": self.images_seen,
                 "config": to_dict(self.config), "run": self.run_facts,
                 "mixed_precision": self.accelerator.mixed_precision, **state}
        path = save_checkpoint(self.accelerator, self.out, self.step, state,
                               lineage=self.lineage, **parts)
        self.last_saved = self.step
        return path

    def log(self, values: dict, guard, bar=None) -> None:
        """One log line: the trackers, ``log.jsonl`` (main process) and the progress bar."""
        from ..io import append_jsonl

        self.accelerator.log(values, step=self.step)
        if self.main:
            record = {k: finite_or_none(v) for k, v in values.items()}
            append_jsonl(self.out / "log.jsonl", {"step": self.step, **record,
                                                  "nonfinite_skipped": guard.total})

    def tracker_writer(self):
        """TensorBoard's SummaryWriter when that tracker runs (main process), else None."""
        if not self.accelerator.log_with or not self.main:
            return None
        tracker = self.accelerator.get_tracker("tensorboard")
        return getattr(tracker, "writer", None)

    def loop(self, batches, step_fn, guard, checkpoint, *, desc: str, log_every: int,
             log_values, on_step=None) -> int | None:
        """Train from ``self.step`` to ``config.max_steps``.

        Each step: a batch from ``batches`` (an endless iterator already at this step), the
        global RNG reseeded from (seed, step, rank), ``step_fn(batch) -> (StepResult, images)``.
        Then, in this order: the non-finite check (exit 2), the log line every ``log_every``
        steps (``log_values(result, images_per_s) -> dict``), ``on_step(step, is_ckpt)``
        (evaluation, previews), the checkpoint every ``checkpoint_every`` steps, and a pending
        stop signal (a checkpoint, exit 75). Returns None when ``max_steps`` is reached.
        """
        from tqdm.auto import tqdm

        from .resilience import GracefulStop, exit_nonfinite, exit_preempted

        cfg, acc = self.config, self.accelerator
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=desc, unit="step",
                   disable=self.args.no_progress or not self.main, dynamic_ncols=True)
        meter = Throughput()
        from ..runtime import CpuThreads

        threads = CpuThreads(self.device, say=lambda text: bar.write(text) if self.main else None)
        with GracefulStop(acc) as stop:
            while self.step < cfg.max_steps:
                batch = next(batches)
                seed_step(cfg.seed, self.step, acc.process_index)
                result, images = step_fn(batch)
                self.step += 1
                self.images_seen += images
                guard.record(result.skipped, self.step)
                meter.add(images)
                bar.update(1)
                threads.update()

                step, is_last = self.step, self.step == cfg.max_steps
                is_log = step % log_every == 0 or is_last
                is_ckpt = step % cfg.checkpoint_every == 0 or is_last
                if (is_log or is_ckpt or not guard.deferred) and guard.poll(step):
                    return exit_nonfinite(acc, guard, self.out, step)
                if is_log:
                    values = log_values(result, meter.rate())
                    self.log(values, guard)
                    loss = values.get("loss", values.get("loss/total", float("nan")))
                    bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{values['images_per_s']:.1f}")
                if on_step is not None:
                    on_step(step, is_ckpt)
                if is_ckpt:
                    checkpoint()
                if stop.should_stop(step):
                    return exit_preempted(acc, stop, self.out, step, self.last_saved,
                                          checkpoint, bar)
        bar.close()
        return None
