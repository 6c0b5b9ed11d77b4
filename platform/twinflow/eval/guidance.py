"""How much classifier-free guidance a TwinFlow fine-tune baked into its model.

TwinFlow trains with the CFG-enhanced target `v + w (G_hat(c) - G_hat(null))` and samples at guidance 0.
With a frozen teacher the result is the teacher's CFG at scale 1 + w; with an online or EMA teacher the
target refers to the model itself, and its fixed point is a scale of about 1 / (1 - w). This measures
what a run actually reached: on held-out images noised to time t, the least-squares factor s with

    G(x_t, t, t | c) - G(x_t, t, t | null)  ~  s * (v_base(x_t, t | c) - v_base(x_t, t | null))

where v_base is the flow-matching model the fine-tune started from. s = 1: no more guidance than the
base's own conditional model; s = 1 + w at the frozen-teacher fixed point.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def _gap(
    model: VelocityFn, x_t: Tensor, t: Tensor, cond: Mapping[str, Tensor], null_cond: Mapping[str, Tensor]
) -> Tensor:
    return (model(x_t, t, t, dict(cond)) - model(x_t, t, t, dict(null_cond))).float()


@torch.no_grad()
def effective_guidance(
    model: VelocityFn,
    base: VelocityFn,
    images: Tensor,
    cond: Mapping[str, Tensor],
    null_cond: Mapping[str, Tensor],
    *,
    times: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    seed: int = 0,
) -> dict[str, float]:
    """{"scale": s over all times, "scale_t0.2": ..., ...}; `images` (B, C, H, W) held-out data with
    its `cond` (batch B) and the null condition (batch 1 or B)."""
    if not times or any(not 0.0 < t < 1.0 for t in times):
        raise ValueError(f"times must lie strictly between 0 and 1, got {list(times)}")
    gen = torch.Generator(device=images.device).manual_seed(seed)
    B = images.shape[0]
    null = {k: (v.expand(B, *v.shape[1:]) if v.shape[0] == 1 else v) for k, v in null_cond.items()}
    out: dict[str, float] = {}
    num = den = 0.0
    for t in times:
        eps = torch.randn(images.shape, generator=gen, device=images.device, dtype=images.dtype)
        x_t = (1 - t) * images + t * eps
        tt = torch.full((B,), float(t), device=images.device)
        d_model, d_base = _gap(model, x_t, tt, cond, null), _gap(base, x_t, tt, cond, null)
        n, d = float((d_model * d_base).sum()), float((d_base * d_base).sum())
        if d == 0.0:
            raise ValueError(
                "the base model's conditional and null predictions are identical: it ignores "
                "the condition, so no guidance scale can be measured against it"
            )
        out[f"scale_t{t:g}"] = n / d
        num, den = num + n, den + d
    out["scale"] = num / den
    return out
