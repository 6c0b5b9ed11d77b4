"""Learning-rate warm-up, shared by the distributed and the in-process loops."""

from __future__ import annotations

from typing import Any


def lr_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of `train.lr` for the optimizer step numbered `step` (0-based): a linear ramp over
    `warmup_steps` steps, then 1. Small pixel-space transformers trained at a high constant lr from
    random init spike in their first steps without it."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def set_lr(optimizer: Any, lr: float) -> None:
    """The learning rate of the coming optimizer step, on every parameter group (a torch optimizer or
    DeepSpeed's wrapper, which exposes the same `param_groups`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
