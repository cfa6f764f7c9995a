"""The checkpoint format of both trainers: saving, loading, listing, pruning, resuming.

A 72-hour run that dies at hour 70 must lose minutes, not days, and a checkpoint found on disk
must never run code when it is loaded.

**What a checkpoint folder holds.** ``<output_dir>/checkpoints/step-NNNNNNNN/``:

- ``<model>.safetensors`` for each model (``save_model`` of the unwrapped module);
- ``optimizer-<name>.safetensors`` for each optimizer: its state tensors, with the parameter
  groups and non-tensor state as JSON in the file's metadata (``save_optimizer``);
- ``ema.safetensors`` when the run keeps an EMA (``ema.EMA.save``);
- ``posthoc_ema.safetensors`` when the run tracks post-hoc EMA profiles
  (``posthoc_ema.PostHocEMA.save``);
- ``rng-<rank>.safetensors`` for every process: its torch (CPU and its own accelerator)
  generator states, with Python's and NumPy's as JSON in the metadata (``capture_rng``);
- ``trainer_state.json``: step counters and the rest of the trainer's state, the run's config,
  the LR schedulers' and GradScaler's state, the number of processes and ``format``
  (``CHECKPOINT_FORMAT``). It is written last: a folder without it is never a checkpoint.

**Why no pickles.** Models, EMA, optimizer tensors and RNG states are safetensors; everything
else is JSON. accelerate's ``save_state``/``load_state`` is not used: it pickles optimizer and
scheduler state, loads ``register_for_checkpointing`` objects with ``weights_only=False`` (a
crafted ``custom_checkpoint_0.pkl`` runs code), and only logs a failed RNG restore. A
checkpoint folder that contains pickle files (``PICKLE_SUFFIXES``) is refused without opening
them (``read_trainer_state``), and every failure while restoring, the RNG included, is an error
(``CheckpointError``, one line, exit code 2).

**How a save is made atomic.** ``save_checkpoint`` writes into ``checkpoints/.tmp-step-N``,
fsyncs every file and the folder, renames it to ``checkpoints/step-N`` (``os.replace``) and
fsyncs ``checkpoints/``. Older checkpoints are pruned only afterwards, each renamed to a hidden
``.del-*`` name first and then deleted, so a crash mid-delete never leaves a half checkpoint
that looks complete. Hidden leftovers of a crash are never listed and are removed at the next
start (``clean_stale``).

**Resume.** ``resolve_resume`` turns ``--resume`` into a folder (the latest complete one by
default), ``check_resumable`` refuses in one line a checkpoint of another trainer or made with
other settings, ``load_checkpoint`` restores it, and ``checkpoint_lineage`` says which of the
folder's checkpoints the run continues (the others are replaced at its first save).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from ..cli_common import UsageError
from ..io import fsync_path, fsync_tree, recover_dir
from ..speed import match_state_layout

if TYPE_CHECKING:  # annotations only
    from .ema import EMA

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_FORMAT = 2  # 1 was accelerate's save_state folder (pickled optimizer/scheduler/RNG)
TRAINER_STATE = "trainer_state.json"
# Run facts that older checkpoints lack: compared only when the checkpoint records them.
LATER_FACTS = ("data_fingerprint",)
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(UsageError):
    """A checkpoint that cannot (or must not) be resumed from: one line, exit code 2."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files differ from what was saved (a checksum, a non-finite tensor,
    an unreadable or edited ``trainer_state.json``): an automatic resume falls back to the
    previous complete checkpoint."""


# ---------------------------------------------------------------------------------------------
# Integrity: a digest of every file, recorded in trainer_state.json (written last)

DIGEST = "sha256"  # with SHA-NI ~1.7x faster than blake2b on the CPUs measured (docs/training.md)


def file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, DIGEST).hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """``{file name: digest}`` of every file of a checkpoint folder but trainer_state.json."""
    return {p.name: file_digest(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != TRAINER_STATE}


def verify_checkpoint(path: Path, state: dict, warn=None) -> None:
    """Every recorded file is there with its digest, and every floating-point tensor of the
    weights, EMA and optimizer state is finite; else ``DamagedCheckpointError`` naming the
    file. A checkpoint saved before digests were recorded is only checked for finiteness."""
    path = Path(path)
    recorded = state.get("files")
    if recorded is None:
        if warn is not None:
            warn(f"note: {path} records no checksums (saved by an older FaceLDM); its files "
                 "are not verified")
    elif not isinstance(recorded, dict):
        raise DamagedCheckpointError(f"{path / TRAINER_STATE}: 'files' is not a mapping")
    else:
        for name, digest in sorted(recorded.items()):
            file = path / name
            if not file.is_file():
                raise DamagedCheckpointError(f"cannot restore {path}: {name} is missing")
            if file_digest(file) != digest:
                raise DamagedCheckpointError(
                    f"cannot restore {path}: {name} is damaged (its {DIGEST} differs from the "
                    "one recorded when it was saved)")
    for file in sorted(path.glob("*.safetensors")):
        if file.name.startswith("rng-"):
            continue
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise DamagedCheckpointError(
                            f"cannot restore {path}: {file.name} holds non-finite values "
                            f"(NaN or Inf) in {key}")
        except DamagedCheckpointError:
            raise
        except Exception as exc:  # safetensors' own errors: a truncated or foreign file
            raise DamagedCheckpointError(f"cannot restore {path}: {file.name} is unreadable "
                                         f"({type(exc).__name__}: {exc})") from None


# trainer_state.json fields a resume reads, and their types
_STATE_FIELDS = {"trainer": str, "step": int, "images_seen": int, "config": dict,
                 "models": list, "optimizers": list, "num_processes": int, "schedulers": dict}


def check_state_fields(path: Path, state: dict) -> None:
    """The fields a resume reads are there, of their type, and ``step`` is the folder's."""
    for key, typ in _STATE_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            article = "an" if typ is int else "a"
            shown = "missing" if key not in state else \
                f"{value!r}, not {article} {typ.__name__}"
            raise DamagedCheckpointError(f"{path / TRAINER_STATE}: '{key}' is {shown}")
    if state["step"] < 0 or state["images_seen"] < 0 or state["num_processes"] < 1:
        raise DamagedCheckpointError(f"{path / TRAINER_STATE}: negative step or image count")
    folder_step = _step_of(path)
    if folder_step is not None and folder_step != state["step"]:
        raise DamagedCheckpointError(f"{path / TRAINER_STATE} says step {state['step']} inside "
                                     f"{path.name}: edited or moved, not trusted")


# ---------------------------------------------------------------------------------------------
# RNG state saved with a checkpoint (no pickles)

def capture_rng() -> tuple[dict, dict]:
    """(tensors, JSON-able metadata) holding every RNG state of this process."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a checkpoint then resumes on a machine with another
        # number of GPUs (accelerate saves every visible device's state in every rank's file)
        tensors["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        tensors["mps"] = torch.mps.get_rng_state()
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: dict, meta: dict) -> None:
    """Inverse of ``capture_rng``; raises instead of going on with other random numbers."""
    torch.set_rng_state(tensors["torch_cpu"])
    # A GPU checkpoint resumed on a CPU has no CUDA generator to restore: nothing to do (the
    # training randomness comes from per-step seeds anyway, see ``seed_step``).
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"], torch.cuda.current_device())
    if "mps" in tensors and torch.backends.mps.is_available():
        torch.mps.set_rng_state(tensors["mps"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Optimizer state as safetensors + JSON (torch's state_dict is tensors, numbers and lists)

def _json_value(value):
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise TypeError("a tensor hyperparameter with more than one element")
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def save_optimizer(optimizer, path: Path) -> None:
    state = optimizer.state_dict()
    tensors, numbers = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            name = f"{index}/{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                numbers[name] = _json_value(value)
    groups = [{k: _json_value(v) for k, v in group.items()} for group in state["param_groups"]]
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(groups),
                                             "numbers": json.dumps(numbers)})


def load_optimizer(optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    groups = json.loads(meta["param_groups"])
    numbers = json.loads(meta.get("numbers", "{}"))
    current = optimizer.param_groups
    if len(groups) != len(current):
        raise CheckpointError(f"{path.name}: {len(groups)} parameter groups, the optimizer has "
                              f"{len(current)}")
    for saved, now in zip(groups, current, strict=False):
        for key, value in saved.items():  # JSON has no tuples: give back e.g. Adam's betas'
            if isinstance(now.get(key), tuple) and isinstance(value, list):
                saved[key] = tuple(value)
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(numbers.items()):
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # saved contiguous; a channels_last weight's moments must get its layout back (fused AdamW)
    match_state_layout(optimizer)


# ---------------------------------------------------------------------------------------------
# Checkpoints: written to a hidden temporary folder, fsynced, renamed, then old ones pruned.

def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    rest = path.name[len(CHECKPOINT_PREFIX):]
    return int(rest) if path.name.startswith(CHECKPOINT_PREFIX) and rest.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (hidden temporary folders are never listed)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None
             and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_lineage(output_dir: Path, resumed_from: Path | None, step: int) -> list[Path]:
    """The checkpoints in ``output_dir`` this run continues: those up to the step it resumes
    from, when it resumes from one of them. The others (a previous run's after ``--resume
    none`` or ``--resume`` elsewhere, or the abandoned future of an older checkpoint) are
    replaced at this run's first save, so a later auto-resume never picks them."""
    if resumed_from is None or Path(resumed_from).resolve().parent != \
            checkpoint_dir(output_dir).resolve():
        return []
    return [p for p in list_checkpoints(output_dir) if _step_of(p) <= step]


def clean_stale(output_dir: Path) -> list[Path]:
    """Remove what a crash left behind: hidden ``.tmp-*`` / ``.del-*`` folders. Returns them.

    Also puts back an exported ``vae/`` or ``pipeline/`` that a crash left as ``*.old``
    (``export.recover_dir``).
    """
    for name in ("vae", "pipeline"):
        recover_dir(Path(output_dir) / name)
    root = checkpoint_dir(output_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def _discard(path: Path) -> None:
    """Hide ``path`` with one atomic rename, then delete it: never a half-deleted checkpoint
    that still looks complete."""
    hidden = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def save_checkpoint(accelerator, output_dir: Path, step: int, trainer_state: dict, *,
                    models: dict, optimizers: dict, schedulers: dict | None = None,
                    ema: EMA | None = None, keep: int = 2, lineage: list | None = None,
                    extras: list = ()) -> Path:
    """Save everything needed to resume exactly; the folder appears only once complete.

    ``models``/``optimizers``/``schedulers`` map a file name to the object. ``lineage``: the
    checkpoints of this run (oldest first); older ones beyond ``keep`` and every checkpoint not
    in it (a previous run's, after ``--resume none``) are pruned after the new one is in place.
    ``extras``: more state, each written by its ``save(folder)`` (the post-hoc EMA profiles).
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # every process: its own RNG states
    tensors, meta = capture_rng()
    save_file(tensors, str(tmp / _rank_file(accelerator.process_index)),
              metadata={"rng": json.dumps(meta)})
    if main:
        for name, model in models.items():
            save_model(accelerator.unwrap_model(model), str(tmp / f"{name}.safetensors"))
        for name, optimizer in optimizers.items():
            save_optimizer(optimizer, tmp / f"optimizer-{name}.safetensors")
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        for extra in extras:
            extra.save(tmp)
        scaler = getattr(accelerator, "scaler", None)
        scaler_state = None if scaler is None else _json_value_tree(scaler.state_dict())
        payload = dict(trainer_state, format=CHECKPOINT_FORMAT, step=step,
                       num_processes=accelerator.num_processes,
                       models=sorted(models), optimizers=sorted(optimizers),
                       schedulers={k: _json_value_tree(s.state_dict())
                                   for k, s in (schedulers or {}).items()},
                       grad_scaler=scaler_state, ema=ema is not None)
    accelerator.wait_for_everyone()  # all RNG files written
    if main:
        payload["files"] = folder_digests(tmp)  # every rank's files are written
        # trainer_state.json last: a folder without it is never taken for a checkpoint
        (tmp / TRAINER_STATE).write_text(json.dumps(payload, indent=2) + "\n")
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (a fresh run over an old one)
            _discard(final)
        os.replace(tmp, final)
        fsync_path(root)
        if lineage is not None:
            lineage.append(final)
            mine = [p for p in lineage if p.exists()]
            lineage[:] = mine[-keep:] if keep > 0 else mine
            for old in list_checkpoints(output_dir):
                if old not in lineage:
                    _discard(old)
        elif keep > 0:
            for old in list_checkpoints(output_dir)[:-keep]:
                _discard(old)
    accelerator.wait_for_everyone()
    return final


def _json_value_tree(value):
    if isinstance(value, dict):
        return {str(k): _json_value_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value_tree(v) for v in value]
    return _json_value(value)


def read_trainer_state(path: Path) -> dict:
    """The JSON half of a checkpoint, with clear errors for anything that is not ours."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        # Never unpickle: a pickle can run any code while it loads. Our checkpoints hold none;
        # these come from accelerate's save_state (an older FaceLDM) or from someone else.
        raise CheckpointError(
            f"{path} holds pickle files ({', '.join(pickles)}), which can run code when loaded; "
            "FaceLDM checkpoints are safetensors + JSON only, so this one is refused. Delete "
            "those files if you trust them not to matter, or start fresh with --resume none")
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedCheckpointError(f"{state_file} is not valid JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by another version of FaceLDM (format "
                              f"{state.get('format') if isinstance(state, dict) else '?'}, "
                              f"expected {CHECKPOINT_FORMAT}); start fresh with --resume none")
    check_state_fields(path, state)
    return state


def check_resumable(state: dict, path: Path, trainer: str, config_cls, config, run: dict,
                    may_change: tuple = ()) -> None:
    """Refuse, in one line, a checkpoint made by another trainer or with other settings.

    ``run``: facts beyond the config that must match (e.g. the number of training images, the
    global batch); ``may_change``: config fields that do not change what is trained (max_steps,
    how often to save or evaluate).
    """
    from dataclasses import fields

    from ..config import config_from_dict, to_dict

    if state.get("trainer") != trainer:
        raise CheckpointError(f"{path} is a checkpoint of {state.get('trainer')!r}, not of "
                              f"{trainer!r}; pass a {trainer} checkpoint or --resume none")
    saved_dict = state.get("config")
    if not isinstance(saved_dict, dict):
        raise CheckpointError(f"{path / TRAINER_STATE} has no 'config' section")
    try:
        saved = to_dict(config_from_dict(config_cls, saved_dict))
    except (TypeError, ValueError) as exc:  # ConfigError too: e.g. a string for a number
        raise CheckpointError(f"{path / TRAINER_STATE} has an invalid config: {exc}") from None
    now = to_dict(config)
    diffs = [f"--{f.name.replace('_', '-')} {_show(saved[f.name])} (this command: "
             f"{_show(now[f.name])})" for f in fields(config_cls)
             if f.name not in may_change and saved[f.name] != now[f.name]]
    saved_run = state.get("run") or {}
    diffs += [f"{k} {_show(saved_run.get(k))} (this command: {_show(v)})"
              for k, v in run.items() if saved_run.get(k) != v
              and not (k in LATER_FACTS and k not in saved_run)]
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was trained with {'; '.join(diffs)}. Rerun with the "
            f"checkpoint's settings (see its {TRAINER_STATE}), or start fresh with --resume none "
            f"or another --output-dir")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def load_checkpoint(accelerator, path: Path, *, models: dict, optimizers: dict,
                    schedulers: dict | None = None, ema: EMA | None = None,
                    state: dict | None = None) -> dict:
    """Restore models, optimizers, schedulers, GradScaler, EMA and RNG; return trainer state.

    Only safetensors and JSON are read. Every failure, the RNG restore included, is an error:
    a resume that silently continues with other random numbers is not exact.
    """
    path = Path(path)
    state = read_trainer_state(path) if state is None else state
    rank, saved_procs = accelerator.process_index, int(state.get("num_processes", 1))
    # A run resumed in another process layout: a rank the checkpoint has no RNG file for takes
    # another rank's. Training stays exact across layouts through the per-step seeds
    # (``seed_step``, ``draw_global_batch``), not through these states.
    rng_name = _rank_file(rank if saved_procs == accelerator.num_processes
                          else rank % max(saved_procs, 1))
    expected = [f"{n}.safetensors" for n in models] + \
               [f"optimizer-{n}.safetensors" for n in optimizers] + \
               [rng_name] + (["ema.safetensors"] if ema else [])
    missing = [name for name in expected if not (path / name).is_file()]
    if missing or sorted(models) != state.get("models") or \
            sorted(optimizers) != state.get("optimizers"):
        raise CheckpointError(f"{path} is incomplete or from another setup (missing: "
                              f"{', '.join(missing) or 'none'}; holds models "
                              f"{state.get('models')}, optimizers {state.get('optimizers')})")
    try:
        for name, model in models.items():
            load_model(accelerator.unwrap_model(model), str(path / f"{name}.safetensors"),
                       strict=True, device=str(accelerator.device))
        for name, optimizer in optimizers.items():
            load_optimizer(optimizer, path / f"optimizer-{name}.safetensors")
        for name, scheduler in (schedulers or {}).items():
            scheduler.load_state_dict(state["schedulers"][name])
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        if ema is not None:
            ema.load(path / "ema.safetensors")
        rng_file = path / rng_name
        with safe_open(str(rng_file), "pt") as f:
            meta = json.loads((f.metadata() or {})["rng"])
        restore_rng(load_file(str(rng_file)), meta)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged file: say which checkpoint, not a deep traceback
        raise CheckpointError(f"cannot restore {path}: {type(exc).__name__}: {exc}") from exc
    return state


def choose_checkpoint(output_dir: Path, resume: str | None, warn) -> tuple[Path, dict] | None:
    """``--resume`` as (checkpoint folder, its verified trainer state), or None: fresh.

    With ``auto`` a damaged latest checkpoint is passed over, with a one-line ``warn`` naming
    the damaged file, for the newest intact one; when none is intact that is an error. A
    checkpoint given by path must be intact.
    """
    if resume not in (None, "auto"):
        path = resolve_resume(output_dir, resume)
        if path is None:
            return None
        state = read_trainer_state(path)
        verify_checkpoint(path, state, warn)
        return path, state
    damaged = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            state = read_trainer_state(path)
            verify_checkpoint(path, state, warn)
            return path, state
        except DamagedCheckpointError as exc:
            warn(f"warning: {exc}; trying the checkpoint before it")
            damaged.append(path.name)
    if damaged:
        raise CheckpointError(f"every checkpoint in {checkpoint_dir(output_dir)} is damaged "
                              f"({', '.join(damaged)}); start fresh with --resume none")
    return None


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``--resume``: None/"auto" = the latest in output_dir if any, "none" = fresh, else a path."""
    if resume in (None, "auto"):
        return latest_checkpoint(output_dir)
    if resume == "none":
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
    return path
