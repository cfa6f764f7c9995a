"""The speed targets ``ffhq-ldm bench`` checks, and the verdict on each: pure Python, no torch.

Each target names the bench row it is read from (task, batch size, compiled or not) and one of
its numbers. A verdict is ``pass`` or ``fail`` on CUDA; on any other device every target is
``n/a (no CUDA)``: a CPU figure says nothing about a GPU target. A row that did not run (cut by
the time budget, not in ``--only``, not in ``--batch-size``) gives ``not measured: <why>``;
a row that ran and failed (out of memory under the 24 GiB cap, a compile error) is a ``fail``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NO_CUDA = "n/a (no CUDA)"
GIB = 2 ** 30
# The memory target: a 24 GB consumer card (an RTX 4090 has 24,564 MiB, about 24 GiB).
MEMORY_CAP_GIB = 24.0


@dataclass(frozen=True)
class Row:
    """Which bench row a target reads: its task, batch size and whether it was compiled."""
    task: str
    batch: int | None  # None: the row at whatever batch size it ran
    compiled: bool
    fast: bool = True
    label: str | None = None  # how the row is named, when not by compiled/eager

    def matches(self, result: dict) -> bool:
        return (result.get("task") == self.task and bool(result.get("compiled")) == self.compiled
                and result.get("fast", True) == self.fast
                and (self.batch is None or result.get("batch_size") == self.batch))

    def describe(self) -> str:
        how = self.label or (f"{self.task} " + ("compiled" if self.compiled else "eager")
                             + ("" if self.fast else " fp32"))
        return how + ("" if self.batch is None else f", batch {self.batch}")


@dataclass(frozen=True)
class Target:
    name: str
    row: Row
    metric: str  # the key of the row's result
    op: str  # ">=" or "<="
    threshold: float
    unit: str
    over: Row | None = None  # a ratio: row's metric over this row's same metric

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def wanted(self) -> str:
        return f"{self.op} {self.threshold:g}{self.unit}"


TARGETS = (
    Target("UNet train step, batch 256", Row("train-unet", 256, True), "images_per_s", ">=",
           3000, " img/s"),
    Target(f"UNet batch 64 peak memory (EMA, VAE, FFHQ-70k cache, CUDA context; "
           f"allocator capped at {MEMORY_CAP_GIB:g} GiB)", Row("train-unet", 64, True),
           "peak_total_gib", "<=", MEMORY_CAP_GIB, " GiB"),
    Target("latent cache builder: encoded images (each and its mirror)",
           Row("encode", None, False, label="encode (cache builder)"), "images_per_s", ">=",
           5000, " img/s"),
    Target("sampling as `ffhq-ldm sample` (the setting stated in the row)",
           Row("sample", None, True), "images_per_s", ">=", 250, " img/s"),
    Target("autoencoder step: bf16 compiled over fp32 eager", Row("train-vae", None, True),
           "images_per_s", ">=", 2.5, "x", over=Row("train-vae", None, False, fast=False)),
)


def _find(results: list[dict], row: Row) -> dict | None:
    """The row's result: the first that ran, else the first that was planned."""
    found = [r for r in results if row.matches(r)]
    ran = [r for r in found if r.get("images_per_s") is not None]
    return (ran or found or [None])[0]


def _reason_missing(result: dict | None, row: Row) -> str | None:
    """Why ``result`` gives no number: ``None`` if it gives one."""
    if result is None:
        return f"not measured: no {row.describe()} row in this run"
    if result.get("skipped"):
        return f"not measured: {result['skipped']}"
    return None


def judge(target: Target, results: list[dict], cuda: bool) -> dict:
    """One target's line: the value read, and ``pass``, ``fail``, ``n/a (no CUDA)`` or
    ``not measured: ...``."""
    line = {"target": target.name, "wanted": target.wanted(), "value": None,
            "row": target.row.describe()}
    if not cuda:
        return {**line, "verdict": NO_CUDA}
    rows = [target.row] + ([target.over] if target.over else [])
    found = [_find(results, r) for r in rows]
    for result, row in zip(found, rows, strict=True):
        missing = _reason_missing(result, row)
        if missing:
            return {**line, "verdict": missing}
        if result.get("error"):  # it ran and broke: out of memory under the cap, say
            return {**line, "verdict": "fail", "note": f"{row.describe()}: {result['error']}"}
    values = [r.get(target.metric) for r in found]
    if any(v is None for v in values):
        return {**line, "verdict": f"not measured: the row has no {target.metric}"}
    value = values[0] / values[1] if target.over else values[0]
    if target.row.batch is None:
        line["row"] += f", batch {found[0]['batch_size']}"
    return {**line, "value": value, "verdict": "pass" if target.holds(value) else "fail"}


def judge_all(results: list[dict], cuda: bool) -> list[dict]:
    return [judge(t, results, cuda) for t in TARGETS]


def format_targets(lines: list[dict]) -> str:
    """The target table as markdown."""
    out = ["| target | wanted | measured | verdict | row |", "|---|---|---|---|---|"]
    for line in lines:
        value = "-" if line["value"] is None else f"{line['value']:.4g}"
        verdict = line["verdict"] + (f" ({line['note']})" if line.get("note") else "")
        out.append(f"| {line['target']} | {line['wanted']} | {value} | {verdict} | "
                   f"{line['row']} |")
    return "\n".join(out)
