"""EMA of the weights (fp32 shadow), with LDM's warm-up (LitEma): the m-th update (m = 1, 2, ...)
uses decay_m = min(decay, (1 + m) / (10 + m)), so early weights are not frozen in."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


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
        for shadow, p in zip(self.shadow, model.parameters(), strict=False):
            p.copy_(shadow.to(p.dtype))

    def to(self, device) -> EMA:
        self.shadow = [s.to(device) for s in self.shadow]
        if self._skipped is not None:
            self._skipped = self._skipped.to(device)
        return self

    def state_dict(self) -> dict:
        return {"shadow": dict(zip(self.names, self.shadow, strict=True)),
                "num_updates": self.num_updates, "decay": self.decay}

    def save(self, path: Path) -> None:
        tensors = {n: s.detach().cpu().contiguous()
                   for n, s in zip(self.names, self.shadow, strict=True)}
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
