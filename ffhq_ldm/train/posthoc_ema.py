"""Post-hoc EMA: track two power-function EMA profiles, save snapshots, and reconstruct the EMA
of any length after training (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", CVPR 2024, "EDM2": section 3 and appendix C).

**The profiles.** A power-function EMA with exponent gamma averages the weights theta(tau) of
the training so far with weight proportional to tau^gamma (EDM2, section 3.1):

    theta_hat(t) = (gamma + 1) / t^(gamma + 1) * integral_0^t tau^gamma theta(tau) dtau,

which, for weights that change once per step, is the running update

    theta_hat(t) = beta(t) * theta_hat(t - 1) + (1 - beta(t)) * theta(t),
    beta(t) = (1 - 1/t)^(gamma + 1),

with t the number of (non-skipped) optimizer updates so far. Multiplying the betas out, the
weight of theta(tau) in theta_hat(T) is (tau^(gamma+1) - (tau-1)^(gamma+1)) / T^(gamma+1): the
integral of the continuous profile (gamma + 1) s^gamma / T^(gamma+1) over (tau - 1, tau]. So the
discrete update is the continuous average of the piecewise constant weight trajectory, exactly.
Its length is the profile's relative standard deviation (EDM2, section 3.1)

    sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2),

(gamma 16.97 <-> sigma_rel 0.05, gamma 6.94 <-> 0.10, the two EDM2 tracks).

**The reconstruction** (EDM2, appendix C.3). A snapshot i holds theta_hat_i = integral p_i(s)
theta(s) ds with profile p_i = p_{gamma_i, t_i}. Any combination sum_i x_i theta_hat_i has the
profile sum_i x_i p_i; the x that best matches a target profile p_r in L2 solves the normal
equations A x = b, A_ij = <p_i, p_j>, b_i = <p_i, p_r>. For two power profiles the inner
product has a closed form (``profile_inner``). The remaining profile error
||sum x_i p_i - p_r|| / ||p_r|| is reported by ``solve`` for every reconstruction.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..cli_common import UsageError
from .options import POSTHOC_EVERY, POSTHOC_SIGMA_RELS, float_list

SNAPSHOT_DIR = "posthoc_ema"  # OUTPUT/posthoc_ema/step-NNNNNNNN.safetensors
STATE_FILE = "posthoc_ema.safetensors"  # inside a checkpoint folder
DEFAULT_SIGMA_RELS, DEFAULT_EVERY = POSTHOC_SIGMA_RELS, POSTHOC_EVERY
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_SNAPSHOT = re.compile(r"^step-(\d{8})\.safetensors$")


# ---------------------------------------------------------------------------------------------
# sigma_rel <-> gamma, and the profiles' inner products

def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power profile with exponent ``gamma``."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_of(sigma_rel: float) -> float:
    """Inverse of ``sigma_rel_of`` on gamma >= 0, where it is strictly decreasing (from
    sigma_rel 0.2887 at gamma 0 towards 0): bisection in float64."""
    if not 0 < sigma_rel <= sigma_rel_of(0):
        raise UsageError(f"sigma_rel must be in (0, {sigma_rel_of(0):.4f}], got {sigma_rel}")
    lo, hi = 0.0, 1.0
    while sigma_rel_of(hi) > sigma_rel:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sigma_rel_of(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def profile_inner(g1, t1, g2, t2) -> np.ndarray:
    """<p_{g1,t1}, p_{g2,t2}> = integral_0^min(t1,t2) of the product of the two profiles
    p_{g,t}(s) = (g + 1) s^g / t^(g + 1), in log space (t^(g+1) overflows for long runs).
    Broadcasts over numpy arrays."""
    g1, t1, g2, t2 = (np.asarray(v, dtype=np.float64) for v in (g1, t1, g2, t2))
    m = np.minimum(t1, t2)
    log = (np.log(g1 + 1) + np.log(g2 + 1) - np.log(g1 + g2 + 1) + (g1 + g2 + 1) * np.log(m)
           - (g1 + 1) * np.log(t1) - (g2 + 1) * np.log(t2))
    return np.exp(log)


def solve(gammas, times, gamma_r: float, t_r: float) -> tuple[np.ndarray, float]:
    """Coefficients x of the snapshots (profiles ``gammas[i]`` at ``times[i]`` updates) whose
    combination best matches the profile (gamma_r, t_r) in L2, and the relative profile error
    ||sum x_i p_i - p_r|| / ||p_r||."""
    g, t = np.asarray(gammas, dtype=np.float64), np.asarray(times, dtype=np.float64)
    a = profile_inner(g[:, None], t[:, None], g[None, :], t[None, :])
    b = profile_inner(g, t, gamma_r, t_r)
    c = float(profile_inner(gamma_r, t_r, gamma_r, t_r))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = max(float(x @ a @ x - 2 * x @ b + c), 0.0)
    return x, math.sqrt(residual / c)


# ---------------------------------------------------------------------------------------------
# The tracked profiles

class PostHocEMA:
    """Power-function EMAs of a model's parameters (fp32), one per ``sigma_rels`` entry.

    ``update(model, enabled=...)`` is queued on the device: the update count is a device
    tensor and a skipped step (``enabled`` False) changes nothing, without a host sync.
    ``maybe_snapshot(step, out_dir)`` writes ``out_dir/posthoc_ema/step-N.safetensors`` every
    ``every`` steps; ``save``/``load`` put the exact state into / back from a checkpoint folder.
    """

    def __init__(self, model: torch.nn.Module, sigma_rels=DEFAULT_SIGMA_RELS,
                 every: int = DEFAULT_EVERY, dtype: str = "float16"):
        if every < 1:
            raise UsageError("--posthoc-every must be >= 1")
        if dtype not in STORAGE_DTYPES:
            raise UsageError(f"--posthoc-dtype must be one of {', '.join(STORAGE_DTYPES)}")
        if not sigma_rels:
            raise UsageError("--posthoc-sigma-rels needs at least one value")
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_of(s) for s in self.sigma_rels)
        self.every, self.dtype = int(every), dtype
        self.names = [n for n, _ in model.named_parameters()]
        params = [p.detach().float() for p in model.parameters()]
        self.tracks = [[p.clone() for p in params] for _ in self.gammas]
        self.t = torch.zeros((), dtype=torch.float32, device=params[0].device)

    def settings(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "every": self.every, "dtype": self.dtype}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, enabled: bool | torch.Tensor = True) -> None:
        """One update of every profile; call it after each optimizer step."""
        if enabled is False:
            return
        params = [p.detach().float() for p in model.parameters()]
        ok = torch.as_tensor(enabled, dtype=torch.float32, device=self.t.device)
        self.t += ok
        t = torch.clamp(self.t, min=1.0)
        for gamma, track in zip(self.gammas, self.tracks, strict=True):
            # 1 - beta(t) = 1 - (1 - 1/t)^(gamma + 1), accurate for large t in fp32
            weight = -torch.expm1((gamma + 1) * torch.log1p(-1.0 / t)) * ok
            torch._foreach_mul_(track, 1.0 - weight)
            torch._foreach_add_(track, torch._foreach_mul(params, weight))

    def num_updates(self) -> int:
        return int(self.t.item())

    # -- snapshots -------------------------------------------------------------------------

    def _tensors(self, dtype: torch.dtype) -> dict:
        return {f"{i}/{name}": s.detach().to("cpu", dtype).contiguous()
                for i, track in enumerate(self.tracks)
                for name, s in zip(self.names, track, strict=True)}

    def _metadata(self, step: int) -> dict:
        return {"step": str(step), "num_updates": repr(float(self.t.item())),
                "gammas": json.dumps(list(self.gammas)),
                "sigma_rels": json.dumps(list(self.sigma_rels)), "every": str(self.every)}

    def maybe_snapshot(self, step: int, out_dir: Path, final: bool = False) -> Path | None:
        """Write the snapshot of ``step`` when it is due (every ``every`` steps, and the last)."""
        if step % self.every and not final:
            return None
        folder = Path(out_dir) / SNAPSHOT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.safetensors"
        _save_atomic(self._tensors(STORAGE_DTYPES[self.dtype]), path, self._metadata(step))
        return path

    # -- exact resume ----------------------------------------------------------------------

    def save(self, checkpoint_dir: Path) -> None:
        tensors = self._tensors(torch.float32)
        tensors["t"] = self.t.detach().cpu().reshape(1)
        meta = {"settings": json.dumps(self.settings())}
        save_file(tensors, str(Path(checkpoint_dir) / STATE_FILE), metadata=meta)

    def load(self, checkpoint_dir: Path) -> None:
        """Restore from a checkpoint folder; refuses other settings, or a checkpoint without
        post-hoc EMA state (the run was started without ``--posthoc-ema``)."""
        path = Path(checkpoint_dir) / STATE_FILE
        if not path.is_file():
            raise UsageError(f"{checkpoint_dir} has no post-hoc EMA state: the run was started "
                             "without --posthoc-ema; rerun without it, or start fresh with "
                             "--resume none")
        with safe_open(str(path), "pt") as f:
            saved = json.loads((f.metadata() or {})["settings"])
        if saved != self.settings():
            raise UsageError(f"{checkpoint_dir} was trained with post-hoc EMA settings {saved}, "
                             f"not {self.settings()}")
        tensors = load_file(str(path))
        device = self.t.device
        self.t = tensors["t"].reshape(()).to(device)
        self.tracks = [[tensors[f"{i}/{n}"].to(device) for n in self.names]
                       for i in range(len(self.gammas))]

    def prune(self, out_dir: Path, step: int) -> list[Path]:
        """Delete snapshots later than ``step`` (an abandoned future, or a previous run's after
        ``--resume none``): the resumed run rewrites the ones it reaches."""
        gone = [p for p, s in list_snapshots(out_dir) if s > step]
        for path in gone:
            path.unlink()
        return gone


def _save_atomic(tensors: dict, path: Path, metadata: dict) -> None:
    from ..io import fsync_path

    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    fsync_path(tmp)
    tmp.replace(path)
    fsync_path(path.parent)


def from_args(args, model: torch.nn.Module) -> PostHocEMA | None:
    if not args.posthoc_ema:
        return None
    sigma_rels = args.posthoc_sigma_rels
    if isinstance(sigma_rels, str):
        sigma_rels = float_list(sigma_rels)
    return PostHocEMA(model, sigma_rels, args.posthoc_every, args.posthoc_dtype)


# ---------------------------------------------------------------------------------------------
# Reading snapshots back and combining them

def list_snapshots(out_dir: Path) -> list[tuple[Path, int]]:
    """(path, step) of every complete snapshot in a run folder, by step."""
    folder = Path(out_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(p, int(m.group(1))) for p in folder.iterdir() if (m := _SNAPSHOT.match(p.name))]
    return sorted(found, key=lambda item: item[1])


def read_snapshot_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {"step": int(meta["step"]), "num_updates": float(meta["num_updates"]),
            "gammas": json.loads(meta["gammas"]), "sigma_rels": json.loads(meta["sigma_rels"])}


def plan(out_dir: Path, sigma_rel: float, upto_step: int | None = None) -> dict:
    """Which snapshots, with which coefficients, reconstruct profile ``sigma_rel`` at the last
    snapshot (or the one of ``upto_step``). Returns a dict with "entries" [(path, profile
    index, coefficient)], "step", "num_updates", "fit_error"."""
    snaps = list_snapshots(out_dir)
    if upto_step is not None:
        snaps = [(p, s) for p, s in snaps if s <= upto_step]
    if not snaps:
        raise UsageError(f"{Path(out_dir) / SNAPSHOT_DIR} holds no snapshots (was the run "
                         "trained with --posthoc-ema?)")
    metas = [(path, read_snapshot_meta(path)) for path, _ in snaps]
    last = metas[-1][1]
    if upto_step is not None and last["step"] != upto_step:
        raise UsageError(f"no snapshot at step {upto_step}; the last one before is at "
                         f"{last['step']}")
    gammas, times, which = [], [], []
    for path, meta in metas:
        if meta["num_updates"] < 1:
            continue  # nothing averaged yet
        for i, gamma in enumerate(meta["gammas"]):
            gammas.append(gamma)
            times.append(meta["num_updates"])
            which.append((path, i))
    gamma_r = gamma_of(sigma_rel)
    x, err = solve(gammas, times, gamma_r, last["num_updates"])
    return {"entries": [(p, i, float(c)) for (p, i), c in zip(which, x, strict=True)],
            "step": last["step"], "num_updates": last["num_updates"], "fit_error": err,
            "gamma": gamma_r, "sigma_rel": sigma_rel}


def reconstruct(recipe: dict, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The combined weights (fp32, summed in fp64) of a ``plan``: parameter name -> tensor."""
    total: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[int, float]]] = {}
    for path, i, coef in recipe["entries"]:
        by_file.setdefault(path, []).append((i, coef))
    for path, items in by_file.items():
        tensors = load_file(str(path))
        for i, coef in items:
            prefix = f"{i}/"
            for key, value in tensors.items():
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    add = value.double() * coef
                    total[name] = total[name] + add if name in total else add
    if names is not None and set(names) != set(total):
        raise UsageError("the snapshots do not match the model's parameters")
    return {k: v.float() for k, v in total.items()}
