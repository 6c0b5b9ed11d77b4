"""The TwinFlow training objective: one step = a few batched no-grad calls + one grad forward.

Row layout (contiguous): [E2E | MUL | ANY | ADV]; E2E+MUL+ANY are the "base" rows (RCGM target),
MUL+ANY the "cfg" rows. Call plan (B rows, sizes nE, nM, nA, nV, nC = nM + nA, nB = B - nV, nK <= nB
the base rows whose residual uses the rollout):

  stage A  online : fake samples G(eps', 1, 0)           nV rows   (ADV data)
           teacher: CFG pair G_hat(x_t, t, t | c/null)    2 nC rows
  stage k  rollout: rollout sub-step k (k = 1..N-1)       nK rows
  grad            : G(x_t, t, r) on all B rows            B rows
  last     online : rectify pair G(y, -tau, -tau), G(y, tau, tau)  2 nE rows
           rollout: rollout sub-step N                    nK rows

The rectify pair needs the one-step samples x_g = eps - G(eps, 1, 0) of the E2E rows, and those
queries ARE the grad forward's E2E rows (x_t = eps at t = 1, r = 0), which is where the reference takes
them: so the grad forward runs before the last no-grad call and no separate one-step pass is made
(nE rows fewer). Only that one no-grad call runs while the grad forward's activations are held; without
a rectify pair (lambda = 0 or kappa = 0) the grad forward is the last call.
Rows with t - r < delta (about half the MUL rows) take the flow-matching residual G - v, which never
reads the rollout's displacement D, so they are not rolled out (the reference rolls out every row; the
maths is unchanged). At lambda 1/2, B = 32: about 95 instead of 112 no-grad rows per step.
All random draws of a step happen first, in a fixed order (times, eps, fake noise, tau, rectify
noise), so the plan can move calls without changing any value (tests/method/test_twinflow_plan.py
checks loss and gradients against an unbatched step).

The rollout runs on the teacher, except with the frozen teacher: the frozen initial model never learned
jumps (r < t), so, as in the reference, the rollout uses the online model (no grad) and only the CFG pair
comes from the frozen copy. With an online teacher each stage is ONE call, so a step is N + 2 calls; an
EMA teacher makes stage A and the last stage two calls each (N + 4); a frozen one adds one call (stage
A: N + 3).
Empty parts are skipped: no E2E or ADV rows (lambda = 0) drops the fake and rectify parts, an
unconditional model (cond == {}) drops the CFG pair (it would be exactly zero).

Rectify weight: each E2E row adds kappa * (4 / B) * rectify_row to the loss, whatever lambda is. That is
the reference's `kappa * mean over its B/4 E2E rows` at lambda = 0.5, and it keeps every row's push
relative to the base loss (a mean over B rows) fixed when lambda moves rows between groups; a plain
mean over the E2E rows would make it 2 kappa / lambda per row (8 at lambda 0.15), which makes the
one-step samples run away while the fake branch is still untrained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from twinflow.method.conditioning import Cond, cond_batch_size, expand_cond, take_cond
from twinflow.method.config import TwinFlowConfig
from twinflow.method.ema import Teacher
from twinflow.method.groups import BatchLayout, GroupSplit, deal_rows
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


@dataclass
class Draws:
    """Every random value of a step, drawn first in one fixed order: per-row times and noise, the fake
    branch's noise (ADV rows), the rectify pair's tau and noise (E2E rows)."""

    t: Tensor
    r: Tensor
    eps: Tensor
    eps_fake: Tensor
    tau: Tensor | None
    noise_r: Tensor | None

    @classmethod
    def draw(
        cls,
        split: GroupSplit,
        shape: tuple[int, ...],
        *,
        rectify: bool,
        device: torch.device | str,
        generator: torch.Generator | None,
    ) -> Draws:
        g, nE, nV = generator, split.size("e2e"), split.size("adv")
        t, r = sample_times(split, device=device, generator=g)
        eps = normal((split.batch_size, *shape), device=device, generator=g)
        eps_fake = normal((nV, *shape), device=device, generator=g)
        tau = uniform((nE,), device=device, generator=g) if rectify else None
        noise_r = normal((nE, *shape), device=device, generator=g) if rectify else None
        return cls(t, r, eps, eps_fake, tau, noise_r)

    def take(self, rows: Tensor, adv_rows: Tensor, e2e_rows: Tensor) -> Draws:
        """The values of a subset: `rows` of the batch, `adv_rows` / `e2e_rows` within those groups."""
        return Draws(
            self.t[rows],
            self.r[rows],
            self.eps[rows],
            self.eps_fake[adv_rows],
            self.tau[e2e_rows] if self.tau is not None else None,
            self.noise_r[e2e_rows] if self.noise_r is not None else None,
        )


class TwinFlowObjective:
    """`objective(model, x0, cond, teacher=..., null_cond=...) -> ObjectiveOutput`; see module doc."""

    def __init__(self, config: TwinFlowConfig | None = None) -> None:
        self.config = config if config is not None else TwinFlowConfig()
        self._splits: dict[int, GroupSplit] = {}
        self._dealt: dict[tuple[BatchLayout, int], list[GroupSplit]] = {}

    def split(self, batch_size: int) -> GroupSplit:
        """The split of a batch that is a whole optimizer step (one rank, no accumulation)."""
        if batch_size not in self._splits:
            self._splits[batch_size] = self.config.split(batch_size)
        return self._splits[batch_size]

    def slot_split(self, layout: BatchLayout, step: int, rank: int, micro: int, seed: int = 0) -> GroupSplit:
        """This rank's and micro-batch's rows of the global split of step `step`: the shares are realised
        over the whole optimizer step (ranks x micro-batch x accumulation), dealt over its micro-batches
        with a rotation from the seed and step (`groups.deal_rows`), so every rank can compute its own
        part without talking to the others, and a resumed run deals the same rows."""
        offset = (seed + step) % layout.slots
        key = (layout, offset)
        if key not in self._dealt:
            self._dealt[key] = deal_rows(self.split(layout.global_rows), layout, offset)
        return self._dealt[key][layout.slot(rank, micro)]

    def realised(self, layout: BatchLayout) -> dict[str, float]:
        """The split every optimizer step realises: rows per group and the TwinFlow share (logged)."""
        split = self.split(layout.global_rows)
        out = {f"split/{k}": float(v) for k, v in split.as_dict().items()}
        out["split/lambda"] = (split.size("e2e") + split.size("adv")) / split.batch_size
        return out

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
        split: GroupSplit | None = None,
        draws: Draws | None = None,
        lockstep: bool = False,
    ) -> ObjectiveOutput:
        """One micro-batch's loss. `teacher=None` means the online model under no_grad.
        `update_teacher=False` on all but the first micro-batch of an accumulated step keeps the EMA
        at one update per optimizer step. `split`: this micro-batch's rows of the step's global split
        (`slot_split`); default: the batch is the whole step. Row weights are per micro-batch row, so
        the mean of the micro-batches' losses (what accumulation and the all-reduce take) is the loss
        of the global batch computed at once, with the rectify term at kappa * 4 / global rows.
        `draws`: the step's random values given instead of drawn (tests split one global draw).
        `lockstep` (several ranks): every rank makes the same model calls in the same order whatever
        rows its micro-batch holds, a call whose rows all sit on other ranks running on one padding row
        and discarding it: ZeRO-3 gathers weights inside every forward, and an averaged teacher of a
        sharded model gathers its slices, so a rank that skipped a call would hang the others."""
        cfg = self.config
        cond = dict(cond or {})
        B, dev = int(x0.shape[0]), x0.device
        nc = cond_batch_size(cond)
        if nc is not None and nc != B:
            raise ValueError(f"cond has batch size {nc} but x0 has {B}")
        split = split if split is not None else self.split(B)
        if split.batch_size != B:
            raise ValueError(f"group split of {split.batch_size} rows for a micro-batch of {B}")
        E, C, V, base = split.e2e, split.cfg, split.adv, split.base
        nE, nC, nV, nB = split.size("e2e"), C.stop - C.start, split.size("adv"), base.stop
        rectify = nE > 0 and cfg.kappa > 0
        # with lockstep, the last stage runs wherever the step has E2E rows on any rank
        last_stage = rectify or (lockstep and cfg.rectifies)
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
        if lockstep:
            one = torch.ones(1, device=dev)
            log.pad = Query(x0[:1].float(), one, one, take_cond(cond, slice(0, 1)))
        g = generator
        x = x0.float()
        shape = tuple(x.shape[1:])
        if draws is None:
            draws = Draws.draw(split, shape, rectify=rectify, device=dev, generator=g)
        t, r, eps, eps_fake, tau, noise_r = (
            draws.t,
            draws.r,
            draws.eps,
            draws.eps_fake,
            draws.tau,
            draws.noise_r,
        )
        cond_e, cond_c, cond_v, cond_b = (take_cond(cond, s) for s in (E, C, V, base))

        # Stage A: fake samples (online), CFG pair (teacher).
        ones_v, zeros_v = torch.ones(nV, device=dev), torch.zeros(nV, device=dev)
        online_q = [Query(eps_fake, ones_v, zeros_v, cond_v)]
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

        # Rollout (teacher), only on rows whose residual uses it (t - r >= delta, see rcgm_residual);
        # the others keep D = 0. With the rectify pair on, its last sub-step waits for the grad forward.
        x_start, t_start = rollout_start(x_t[base], v_base, t[base], r[base], cfg.delta)
        keep = rollout_rows(t[base], r[base], cfg.delta)
        times = rollout_times(t_start[keep], r[base][keep], cfg.rollout_order)
        cond_k = take_cond(cond_b, keep)
        y = x_start[keep]
        rolled = y.shape[0] > 0
        D_k = torch.zeros_like(y)
        steps = [(times[k], times[k + 1]) for k in range(cfg.rollout_order)] if rolled or lockstep else []
        last = steps.pop() if last_stage and steps else None
        for s, s_next in steps:
            _, (g_k,) = self._stage(log, model, rollout_fn, [], [Query(y, s, s_next, cond_k)])
            y, disp = rollout_step(y, s, s_next, g_k)
            D_k = D_k + disp

        # The one forward with gradient, over all B rows.
        (G,) = log.run(model, [Query(x_t, t, r, cond)], grad=True)

        # Last stage: the rectify pair (online) on the one-step samples x_g = eps - G_e, whose values
        # are the grad forward's E2E rows (x_t = eps, t = 1, r = 0), + the last rollout sub-step.
        if last_stage:
            online_q = []
            if rectify:
                x_g = eps[E] - G[E].detach()
                y_r = noisy(x_g, tau, noise_r)
                online_q = [Query(y_r, -tau, -tau, cond_e), Query(y_r, tau, tau, cond_e)]
            teacher_q = [Query(y, last[0], last[1], cond_k)] if last is not None else []
            out_online, out_teacher = self._stage(log, model, rollout_fn, online_q, teacher_q)
            if rectify:
                dv = velocity_gap(out_online[0], out_online[1])
            if last is not None:
                _, disp = rollout_step(y, last[0], last[1], out_teacher[0])
                D_k = D_k + disp
        D = torch.zeros_like(x_start)
        if rolled:
            D[keep] = D_k

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
