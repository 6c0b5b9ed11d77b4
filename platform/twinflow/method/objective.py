"""What every objective returns, the non-finite guard, and the batched, counted model calls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from twinflow.method.conditioning import Cond, cat_cond

VelocityModel = Callable[[Tensor, Tensor, Tensor, Mapping[str, Tensor]], Tensor]


@dataclass
class ObjectiveOutput:
    loss: Tensor
    metrics: dict[str, float]
    model_calls: int = 0
    nograd_rows: int = 0


class NonFiniteLossError(FloatingPointError):
    """The loss (or a per-group loss) is NaN/inf: stop before the optimizer step spreads it."""


def finalize_metrics(
    named: dict[str, Tensor], *, on_nonfinite: str, extra: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Turn scalar tensors into floats with one device sync, and apply the non-finite policy."""
    names = list(named)
    values = torch.stack([named[k].detach().float().reshape(()) for k in names]).tolist() if names else []
    metrics = dict(zip(names, values))
    metrics.update(extra or {})
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        if on_nonfinite == "raise":
            shown = ", ".join(f"{k}={metrics[k]}" for k in names)
            raise NonFiniteLossError(f"non-finite loss in {bad}: {shown}")
        metrics["nonfinite"] = 1.0
    return metrics


@dataclass
class Query:
    """One block of rows for a model call."""

    x: Tensor
    t: Tensor
    r: Tensor
    cond: Cond

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


@dataclass
class CallLog:
    """Concatenates queries into single model calls and counts calls and no-grad rows."""

    input_dtype: torch.dtype = torch.float32
    #: with lockstep (several ranks), a call with no rows of its own runs on this one row instead
    pad: Query | None = None
    calls: int = 0
    nograd_rows: int = 0
    sizes: list[int] = field(default_factory=list)

    def run(self, fn: VelocityModel, queries: Sequence[Query], *, grad: bool = False) -> list[Tensor]:
        """One call of `fn` on all (non-empty) queries; outputs are split back per query (float32)."""
        live = [q for q in queries if q.rows > 0]
        if not live:
            if self.pad is not None:  # the other ranks make this call: make it too, keep nothing
                p = self.pad
                with torch.no_grad():
                    fn(p.x.to(self.input_dtype), p.t, p.r, p.cond)
                self.calls += 1
            return [q.x.new_empty(q.x.shape) for q in queries]
        x = torch.cat([q.x for q in live]).to(self.input_dtype)
        t = torch.cat([q.t for q in live])
        r = torch.cat([q.r for q in live])
        cond = cat_cond([q.cond for q in live])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = fn(x, t, r, cond)
        if out.shape != x.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        self.calls += 1
        self.sizes.append(int(x.shape[0]))
        if not grad:
            self.nograd_rows += int(x.shape[0])
        parts = iter(out.float().split([q.rows for q in live]))
        return [next(parts) if q.rows > 0 else q.x.new_empty(q.x.shape) for q in queries]
