"""Per-row losses and the time weight. Everything is computed in float32 whatever the model dtype."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

RowLoss = Callable[[Tensor, Tensor], Tensor]
BARRON_C = 1e-3


def time_weight(t: Tensor, r: Tensor) -> Tensor:
    """w(t, r) = 1 + tan(0.4 pi (1 - (|t| - |r|))): 1 for a full jump, ~4.08 at r = t, so
    near-instantaneous queries (whose residuals are small) are not drowned by full jumps."""
    gap = t.float().abs() - r.float().abs()
    return 1.0 + torch.tan(0.4 * math.pi * (1.0 - gap))


def _row_mse(pred: Tensor, target: Tensor) -> Tensor:
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def mse_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per row, shape (B,)."""
    return _row_mse(pred, target)


def barron_loss(pred: Tensor, target: Tensor, c: float = BARRON_C) -> Tensor:
    """Pseudo-Huber (Barron, alpha = 1) per row: m * sg((m / c^2 + 1)^(-1/2)) / c, m = row MSE.
    The stop-gradient on the scale makes the gradient that of m divided by ~sqrt(m): every row's
    gradient is normalised by its RMS residual, so rows with large targets do not dominate."""
    m = _row_mse(pred, target)
    scale = (m.detach() / (c * c) + 1.0).rsqrt()
    return m * scale / c


LOSSES: dict[str, RowLoss] = {"barron": barron_loss, "mse": mse_loss}


def row_loss(name: str) -> RowLoss:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


def config_row_loss(config: Any, pred: Tensor, target: Tensor) -> Tensor:
    """The per-row loss a method config names (`loss: barron | mse`, with its `barron_c`)."""
    if config.loss == "barron":
        return barron_loss(pred, target, config.barron_c)
    return row_loss(config.loss)(pred, target)
