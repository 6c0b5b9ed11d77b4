"""The TwinFlow training objective: one step = a few batched no-grad calls + one grad forward.

Row layout (contiguous): [E2E | MUL | ANY | ADV]; E2E+MUL+ANY are the "base" rows (RCGM target),
MUL+ANY the "cfg" rows. Call plan (B rows, sizes nE, nM, nA, nV, nC = nM + nA, nB = B - nV, nK <= nB
the base rows whose residual uses the rollout):

  stage A  online : fake samples G(eps', 1, 0)        nV rows   (ADV data)
                    one-step G(eps, 1, 0) for E2E rows nE rows   (x_g = eps - G_e, values only)
           teacher: CFG pair G_hat(x_t, t, t | c/null) 2 nC rows
  stage B  online : rectify pair G(y, -tau, -tau), G(y, tau, tau)  2 nE rows
           rollout: rollout sub-step 1                 nK rows
  stage k  rollout: rollout sub-step k (k = 2..N)      nK rows
  grad            : G(x_t, t, r) on all B rows         B rows

Rows with t - r < delta (about half the MUL rows) take the flow-matching residual G - v, which never
reads the rollout's displacement D, so they are not rolled out (the reference rolls out every row; the
maths is unchanged). At lambda 1/2, B = 32: about 104 instead of 112 no-grad rows per step.
The one-step values of the E2E rows equal the grad forward's E2E rows (x_t = eps at t = 1), which is
where the reference takes them; running the grad forward first to reuse them saves nE rows but was
measured slower on CPU (the backward no longer follows its forward: docs/benchmarks.md), so the grad
forward stays last.

The rollout runs on the teacher, except with the frozen teacher: the frozen initial model never learned
jumps (r < t), so, as in the reference, the rollout uses the online model (no grad) and only the CFG pair
comes from the frozen copy. With an online teacher each stage is ONE call, so a step is N + 2 calls; an
EMA teacher makes stages A and B two calls each (N + 4); a frozen one adds one call (stage A: N + 3).
Empty parts are skipped: no E2E or ADV rows (lambda = 0) drops the fake and rectify parts, an
unconditional model (cond == {}) drops the CFG pair (it would be exactly zero).

Rectify weight: each E2E row adds kappa * (4 / B) * rectify_row to the loss, whatever lambda is. That is
the reference's `kappa * mean over its B/4 E2E rows` at lambda = 0.5, and it keeps every row's push
relative to the base loss (a mean over B rows) fixed when lambda moves rows between groups; a plain
mean over the E2E rows would make it 2 kappa / lambda per row (8 at lambda 0.15), which makes the
one-step samples run away while the fake branch is still untrained.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from twinflow.method.conditioning import Cond, cond_batch_size, expand_cond, take_cond
from twinflow.method.config import TwinFlowConfig
from twinflow.method.ema import Teacher
from twinflow.method.groups import GroupSplit
from twinflow.method.losses import barron_loss, mse_loss, time_weight
from twinflow.method.objective import CallLog, ObjectiveOutput, Query, VelocityModel, finalize_metrics
from twinflow.method.targets import (
    enhance_velocity,
    noisy,
    rcgm_residual,
    rcgm_target_from_residual,
    rectify_loss,
    rollout_rows,
    rollout_start,
    rollout_step,
    rollout_times,
    velocity_gap,
)
from twinflow.method.times import normal, sample_times, uniform

#: The reference's share of E2E rows (quarters): the rectify term is normalised by it, not by lambda.
RECTIFY_ROW_SHARE = 0.25
#: A one-step pixel above this (data in [-1, 1]) counts as saturated in the `sat_onestep` metric.
SATURATION_LEVEL = 0.9


class TwinFlowObjective:
    """`objective(model, x0, cond, teacher=..., null_cond=...) -> ObjectiveOutput`; see module doc."""

    def __init__(self, config: TwinFlowConfig | None = None) -> None:
        self.config = config if config is not None else TwinFlowConfig()
        self._splits: dict[int, GroupSplit] = {}

    def split(self, batch_size: int) -> GroupSplit:
        if batch_size not in self._splits:
            self._splits[batch_size] = self.config.split(batch_size)
        return self._splits[batch_size]

    def make_teacher(self, model: torch.nn.Module, adapters_off=None) -> Teacher:
        """The teacher this config asks for (mode and EMA decay)."""
        return Teacher(model, self.config.teacher, decay=self.config.ema_decay, adapters_off=adapters_off)

    def row_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.config.loss == "barron":
            return barron_loss(pred, target, self.config.barron_c)
        return mse_loss(pred, target)

    def _stage(
        self,
        log: CallLog,
        model: VelocityModel,
        teacher: VelocityModel | None,
        online_q: list[Query],
        teacher_q: list[Query],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Online and teacher queries of one dependency stage: one call when the teacher is the online
        model (`None`)."""
        if teacher is None:
            outs = log.run(model, online_q + teacher_q)
            return outs[: len(online_q)], outs[len(online_q) :]
        return log.run(model, online_q), log.run(teacher, teacher_q)

    def __call__(
        self,
        model: VelocityModel,
        x0: Tensor,
        cond: Mapping[str, Tensor] | None = None,
        *,
        teacher: Teacher | None,
        null_cond: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        update_teacher: bool = True,
    ) -> ObjectiveOutput:
        """One training step's loss. `teacher=None` means the online model under no_grad.
        `update_teacher=False` on all but the first micro-batch of an accumulated step keeps the EMA
        at one update per optimizer step."""
        cfg = self.config
        cond = dict(cond or {})
        B, dev = int(x0.shape[0]), x0.device
        nc = cond_batch_size(cond)
        if nc is not None and nc != B:
            raise ValueError(f"cond has batch size {nc} but x0 has {B}")
        split = self.split(B)
        E, C, V, base = split.e2e, split.cfg, split.adv, split.base
        nE, nC, nV, nB = split.size("e2e"), C.stop - C.start, split.size("adv"), base.stop
        rectify = nE > 0 and cfg.kappa > 0
        use_cfg = cfg.enhanced_ratio > 0 and nC > 0 and bool(cond)
        if use_cfg and null_cond is None:
            raise ValueError(
                "a conditional model needs null_cond for the baked-in CFG (or set enhanced_ratio: 0)"
            )
        if teacher is not None and update_teacher:
            teacher.update()
        # Who answers the CFG pair and who the rollout (None = the online model, batched with its calls).
        cfg_fn: VelocityModel | None = None if teacher is None or teacher.is_online else teacher
        rollout_fn: VelocityModel | None = (
            None if teacher is None or teacher.mode in ("online", "frozen") else teacher
        )

        log = CallLog(input_dtype=x0.dtype if x0.is_floating_point() else torch.float32)
        g = generator
        x = x0.float()
        shape = tuple(x.shape[1:])
        t, r = sample_times(split, device=dev, generator=g)
        eps = normal(x.shape, device=dev, generator=g)
        cond_e, cond_c, cond_v, cond_b = (take_cond(cond, s) for s in (E, C, V, base))

        # Stage A: fake samples, E2E one-step values, CFG pair.
        online_q: list[Query] = []
        ones_v, zeros_v = torch.ones(nV, device=dev), torch.zeros(nV, device=dev)
        eps_fake = normal((nV, *shape), device=dev, generator=g)
        online_q.append(Query(eps_fake, ones_v, zeros_v, cond_v))
        if rectify:
            online_q.append(Query(eps[E], torch.ones(nE, device=dev), torch.zeros(nE, device=dev), cond_e))
        teacher_q: list[Query] = []
        t_c = t[C]
        if use_cfg:
            x_c = noisy(x[C], t_c, eps[C])
            null_c: Cond = expand_cond(null_cond or {}, nC)
            teacher_q += [Query(x_c, t_c, t_c, cond_c), Query(x_c, t_c, t_c, null_c)]
        out_online, out_teacher = self._stage(log, model, cfg_fn, online_q, teacher_q)
        x_fake = eps_fake - out_online[0]

        x_clean = torch.cat([x[base], x_fake]) if nV else x
        x_t = noisy(x_clean, t, eps)
        v = eps - x_clean  # ADV rows: exactly their flow-matching target eps - x_fake
        v_base = v[base]
        if use_cfg:
            v_c = enhance_velocity(
                v[C], t_c, out_teacher[0], out_teacher[1], cfg.enhanced_ratio, cfg.cfg_interval
            )
            v_base = torch.cat([v[E], v_c, v[C.stop : nB]])

        # Stage B: rectify pair (online) + first rollout sub-step (teacher). The rollout only runs on
        # rows whose residual uses it (t - r >= delta, see rcgm_residual); the others keep D = 0.
        online_q = []
        if rectify:
            x_g = eps[E] - out_online[1]
            tau = uniform((nE,), device=dev, generator=g)
            y_r = noisy(x_g, tau, normal(x_g.shape, device=dev, generator=g))
            online_q += [Query(y_r, -tau, -tau, cond_e), Query(y_r, tau, tau, cond_e)]
        x_start, t_start = rollout_start(x_t[base], v_base, t[base], r[base], cfg.delta)
        keep = rollout_rows(t[base], r[base], cfg.delta)
        times = rollout_times(t_start[keep], r[base][keep], cfg.rollout_order)
        cond_k = take_cond(cond_b, keep)
        y = x_start[keep]
        teacher_q = [Query(y, times[0], times[1], cond_k)] if y.shape[0] else []
        out_online, out_teacher = self._stage(log, model, rollout_fn, online_q, teacher_q)
        dv = velocity_gap(out_online[0], out_online[1]) if rectify else None
        D = torch.zeros_like(x_start)
        if y.shape[0]:
            y, D_k = rollout_step(y, times[0], times[1], out_teacher[0])
            for k in range(1, cfg.rollout_order):
                _, (g_k,) = self._stage(
                    log, model, rollout_fn, [], [Query(y, times[k], times[k + 1], cond_k)]
                )
                y, disp = rollout_step(y, times[k], times[k + 1], g_k)
                D_k = D_k + disp
            D[keep] = D_k

        # The one forward with gradient, over all B rows.
        (G,) = log.run(model, [Query(x_t, t, r, cond)], grad=True)
        with torch.no_grad():
            T_base = rcgm_target_from_residual(
                G[base], rcgm_residual(G[base], v_base, D, t[base], r[base], cfg.delta)
            )
            target = torch.cat([T_base, v[V]])
            weight = time_weight(t, r) if cfg.time_weighting else torch.ones_like(t)
            weight[V] = 1.0
        per_row = self.row_loss(G, target) * weight
        loss = per_row.mean()
        named: dict[str, Tensor] = {}
        for name in ("e2e", "mul", "any", "adv"):
            if split.size(name):
                named[f"loss_{name}"] = per_row[split.slice(name)].mean()
        if rectify:
            rect_rows = rectify_loss(G[E], dv, self.row_loss)
            loss = loss + cfg.kappa * rect_rows.sum() / (RECTIFY_ROW_SHARE * B)
            named["loss_rect"] = rect_rows.mean()
            named.update(onestep_diagnostics(x_g, dv))
        named["total"] = loss
        metrics = finalize_metrics(
            named,
            on_nonfinite=cfg.on_nonfinite,
            extra={"model_calls": float(log.calls), "nograd_rows": float(log.nograd_rows)},
        )
        return ObjectiveOutput(loss=loss, metrics=metrics, model_calls=log.calls, nograd_rows=log.nograd_rows)


@torch.no_grad()
def onestep_diagnostics(x_g: Tensor, dv: Tensor) -> dict[str, Tensor]:
    """What shows a run-away early in a fine-tune: |dv|, whether dv points back toward the origin
    (`dv_cos` = mean cos(dv, -x_g); negative while the untrained fake branch pushes samples outward),
    and the share of saturated one-step pixels."""
    flat_dv, flat_x = dv.flatten(1).float(), x_g.flatten(1).float()
    cos = torch.nn.functional.cosine_similarity(flat_dv, -flat_x, dim=1, eps=1e-12)
    return {
        "dv_abs": dv.abs().mean(),
        "dv_cos": cos.mean(),
        "sat_onestep": (flat_x > SATURATION_LEVEL).float().mean(),
    }
