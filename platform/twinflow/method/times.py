"""Random draws for one step: per-group (t, r) and noise, all reproducible from one torch.Generator."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from twinflow.method.groups import GroupSplit

MUL_MAX_GAP = 0.05  # MUL rows: r = t - u * 0.05 * t, a near-instantaneous query


def uniform(
    shape: Sequence[int],
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """U(0, 1) drawn on the generator's device (so a CPU generator also seeds CUDA runs)."""
    if generator is None:
        return torch.rand(tuple(shape), device=device, dtype=dtype)
    return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def normal(
    shape: Sequence[int],
    *,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """N(0, I), like `uniform`."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_times(
    split: GroupSplit, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(t, r), shape (B,) float32, per group:
    E2E t=1, r=0; MUL t~U, r=t-u*0.05t; ANY t~U, r~U(0,t); ADV t=r=-s, s~U."""
    parts_t: list[Tensor] = []
    parts_r: list[Tensor] = []
    for name in ("e2e", "mul", "any", "adv"):
        n = split.size(name)
        if n == 0:
            continue
        if name == "e2e":
            t, r = torch.ones(n, device=device), torch.zeros(n, device=device)
        else:
            t = uniform((n,), device=device, generator=generator)
            if name == "adv":
                t = -t
                r = t.clone()
            else:
                u = uniform((n,), device=device, generator=generator)
                gap = MUL_MAX_GAP if name == "mul" else 1.0
                r = t - u * gap * t
        parts_t.append(t)
        parts_r.append(r)
    return torch.cat(parts_t), torch.cat(parts_r)
