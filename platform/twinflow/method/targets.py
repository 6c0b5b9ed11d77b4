"""Targets for the base any-step loss (RCGM) and the baked-in classifier-free guidance.

All functions here work on detached values: only `G` in the final loss carries gradient.
The RCGM target for a query (x_t, t, r) with true velocity v:
  x' = x_t - delta v,  t' = max(t - delta, r)
  teacher rollout t' -> r in N equal sub-steps, D = sum of displacements (s_k - s_{k+1}) g_k
  R = ((t - r) G - (delta v + D)) / delta   if t - r >= delta   (no division by t - r anywhere)
  R = G - v                                 otherwise          (ordinary flow matching)
  T = sg(G) - clip(R, -1, 1)
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

VelocityFn = Callable[[Tensor, Tensor, Tensor, Mapping[str, Tensor]], Tensor]


def _rows(v: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) tensor over the trailing dims of `like`."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def rollout_start(x_t: Tensor, v: Tensor, t: Tensor, r: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """One exact step of size delta on the true path: (x', t') with t' = max(t - delta, r)."""
    return x_t - delta * v, torch.maximum(t - delta, r)


def rollout_times(t_start: Tensor, r: Tensor, order: int) -> list[Tensor]:
    """N + 1 equally spaced times from t' to r (both included)."""
    if order < 1:
        raise ValueError(f"rollout order must be >= 1, got {order}")
    return [t_start + (r - t_start) * (k / order) for k in range(order + 1)]


def rollout_rows(t: Tensor, r: Tensor, delta: float) -> slice | Tensor:
    """Rows whose RCGM residual uses the rollout (t - r >= delta, the test in `rcgm_residual`); the
    others fall back to flow matching, so rolling them out is wasted work. All rows: a slice (no
    gather); else an index tensor (one host sync on an accelerator)."""
    used = (t - r) >= delta
    if bool(used.all()):
        return slice(None)
    return used.nonzero().flatten()


def rollout_step(y: Tensor, s: Tensor, s_next: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Jump y from s to s_next with average velocity g; returns (y_next, displacement)."""
    disp = _rows(s - s_next, y) * g
    return y - disp, disp


@torch.no_grad()
def teacher_rollout(
    teacher: VelocityFn, x_start: Tensor, times: list[Tensor], cond: Mapping[str, Tensor]
) -> Tensor:
    """D = total displacement of the teacher's N-step rollout along `times` (unbatched helper)."""
    y, total = x_start, torch.zeros_like(x_start)
    for s, s_next in zip(times[:-1], times[1:]):
        g = teacher(y, s, s_next, cond).to(y.dtype)
        y, disp = rollout_step(y, s, s_next, g)
        total = total + disp
    return total


@torch.no_grad()
def rcgm_residual(G: Tensor, v: Tensor, D: Tensor, t: Tensor, r: Tensor, delta: float) -> Tensor:
    """R, elementwise; rows with t - r < delta fall back to flow matching (G - v)."""
    G = G.detach()
    gap = _rows(t - r, G)
    consistency = (gap * G - (delta * v + D)) / delta
    return torch.where(gap >= delta, consistency, G - v)


@torch.no_grad()
def rcgm_target_from_residual(G: Tensor, R: Tensor) -> Tensor:
    """T = sg(G) - clip(R, -1, 1)."""
    return G.detach() - R.clamp(-1.0, 1.0)


@torch.no_grad()
def rcgm_target(
    G: Tensor,
    x_t: Tensor,
    v: Tensor,
    t: Tensor,
    r: Tensor,
    cond: Mapping[str, Tensor],
    teacher: VelocityFn,
    *,
    delta: float = 0.01,
    order: int = 2,
) -> Tensor:
    """The whole RCGM target in one function (the objective batches the same steps differently)."""
    x_start, t_start = rollout_start(x_t, v, t, r, delta)
    D = teacher_rollout(teacher, x_start, rollout_times(t_start, r, order), cond)
    return rcgm_target_from_residual(G, rcgm_residual(G, v, D, t, r, delta))


def cfg_mask(t: Tensor, interval: tuple[float, float]) -> Tensor:
    """Rows whose t lies strictly inside the guidance interval."""
    lo, hi = interval
    return (t > lo) & (t < hi)


@torch.no_grad()
def enhance_velocity(
    v: Tensor, t: Tensor, pred_cond: Tensor, pred_null: Tensor, ratio: float, interval: tuple[float, float]
) -> Tensor:
    """v + w (G_hat(x_t,t,t|c) - G_hat(x_t,t,t|null)) on rows with lo < t < hi; others unchanged.
    Baking CFG into the target makes the trained model guided at guidance 0 (scale 1 + w)."""
    mask = _rows(cfg_mask(t, interval).to(v.dtype), v)
    return v + ratio * mask * (pred_cond.to(v.dtype) - pred_null.to(v.dtype))


def noisy(x: Tensor, time: Tensor, noise: Tensor) -> Tensor:
    """A point on the linear path: (1 - |t|) x + |t| noise."""
    a = _rows(time.abs(), x)
    return (1 - a) * x + a * noise


@torch.no_grad()
def velocity_gap(fake: Tensor, real: Tensor) -> Tensor:
    """dv = clip(G(y, -tau, -tau) - G(y, tau, tau), -1, 1): fake minus real velocity."""
    return (fake - real).clamp(-1.0, 1.0)


def rectify_loss(G_e: Tensor, dv: Tensor, row_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Per-row loss(G_e, sg(G_e - dv)). Descending it moves G_e toward G_e - dv, so the one-step
    sample x_g = eps - G_e moves along +dv = v_fake - v_real: toward the real distribution
    (reverse-KL / DMD direction in velocity form)."""
    return row_loss(G_e, G_e.detach() - dv.detach())
