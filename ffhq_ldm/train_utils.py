"""Pieces both trainers share: EMA, safe checkpoints and resume, samplers, logging helpers."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "step-"


# ---------------------------------------------------------------------------------------------
# EMA of the weights (fp32 shadow), with LDM's warm-up (LitEma): the m-th update (m = 1, 2, ...)
# uses decay_m = min(decay, (1 + m) / (10 + m)), so early weights are not frozen in.

class EMA:
    """Exponential moving average of a model's parameters, kept in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.names = [n for n, p in model.named_parameters()]
        self.shadow = [p.detach().float().clone() for p in model.parameters()]
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update will use."""
        m = self.num_updates + 1
        return min(self.decay, (1 + m) / (10 + m)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step; call it only after an optimizer step (gradients synchronised)."""
        decay = self.current_decay()
        params = [p.detach().float() for p in model.parameters()]
        # shadow <- shadow + (1 - decay) * (param - shadow), one fused kernel per dtype group
        torch._foreach_lerp_(self.shadow, params, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for shadow, p in zip(self.shadow, model.parameters()):
            p.copy_(shadow.to(p.dtype))

    def to(self, device) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow)), "num_updates": self.num_updates,
                "decay": self.decay}

    def save(self, path: Path) -> None:
        tensors = {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.shadow)}
        save_file(tensors, str(path), metadata={"num_updates": str(self.num_updates),
                                                 "decay": str(self.decay)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        tensors = load_file(str(path))
        if set(tensors) != set(self.names):
            raise ValueError(f"EMA file {path} does not match the model's parameters")
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [tensors[n].to(device) for n in self.names]
        with safe_open(str(path), "pt") as f:
            self.num_updates = int(f.metadata()["num_updates"])


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed, then old ones pruned.

def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict,
                    ema: EMA | None = None, keep: int = 2) -> Path | None:
    """Save everything needed to resume; the folder appears only once complete."""
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema: EMA | None = None) -> dict:
    """Restore accelerate's state (models, optimizers, schedulers, RNG) and return ours."""
    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no trainer_state.json)")
    accelerator.load_state(str(path))
    if ema is not None:
        ema.load(path / "ema.safetensors")
    return json.loads((path / "trainer_state.json").read_text())


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``--resume`` semantics: None/"auto" = latest in output_dir if any, "none" = fresh, else a path."""
    if resume in (None, "auto"):
        return latest_checkpoint(output_dir)
    if resume == "none":
        return None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    return path


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


def warmup_lambda(warmup: int):
    """Linear warm-up to the base LR, then constant (LDM keeps the LR constant)."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, warmup))
    return factor
