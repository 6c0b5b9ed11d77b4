"""Plain flow matching (the baseline, and the pre-training stage before a TwinFlow fine-tune).

x_t = (1 - t) x + t eps, t ~ U(0, 1), target v = eps - x, queried at r = t (instantaneous velocity).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from twinflow.method.conditioning import cond_batch_size, mix_cond
from twinflow.method.config import FlowMatchingConfig
from twinflow.method.ema import Teacher
from twinflow.method.losses import config_row_loss
from twinflow.method.objective import CallLog, ObjectiveOutput, Query, VelocityModel, finalize_metrics
from twinflow.method.times import normal, uniform


class FlowMatchingObjective:
    """Same call signature as TwinFlowObjective; `teacher` is accepted and ignored."""

    def __init__(self, config: FlowMatchingConfig | None = None) -> None:
        self.config = config if config is not None else FlowMatchingConfig()

    def make_teacher(self, model: torch.nn.Module, adapters_off: Any = None) -> Teacher:
        """Flow matching needs no teacher: the online model stands in (nothing copied or checkpointed)."""
        return Teacher(model, "online")

    def row_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return config_row_loss(self.config, pred, target)

    def __call__(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Mapping[str, Tensor] | None = None,
        *,
        teacher: Any = None,
        null_cond: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        update_teacher: bool = True,
    ) -> ObjectiveOutput:
        cfg = self.config
        cond = dict(cond or {})
        B, dev = int(x0.shape[0]), x0.device
        nc = cond_batch_size(cond)
        if nc is not None and nc != B:
            raise ValueError(f"cond has batch size {nc} but x0 has {B}")
        x = x0.float()
        t = uniform((B,), device=dev, generator=generator)
        eps = normal(x.shape, device=dev, generator=generator)
        a = t.view(B, *([1] * (x.dim() - 1)))
        x_t = (1 - a) * x + a * eps
        if cfg.cond_dropout > 0 and cond:
            if null_cond is None:
                raise ValueError("cond_dropout > 0 needs null_cond")
            drop = uniform((B,), device=dev, generator=generator) < cfg.cond_dropout
            cond = mix_cond(cond, null_cond, drop)
        log = CallLog(input_dtype=x0.dtype if x0.is_floating_point() else torch.float32)
        (G,) = log.run(model, [Query(x_t, t, t, cond)], grad=True)
        loss = self.row_loss(G, eps - x).mean()
        metrics = finalize_metrics(
            {"loss_fm": loss, "total": loss},
            on_nonfinite=cfg.on_nonfinite,
            extra={"model_calls": 1.0, "nograd_rows": 0.0},
        )
        return ObjectiveOutput(loss=loss, metrics=metrics, model_calls=log.calls, nograd_rows=0)
