"""The batched, reordered call plan of TwinFlowObjective computes the method's step exactly.

`plain_step` is the step as docs/method.md states it: one model call per part, in the method's order,
no batching, no skipped rows (the rollout runs on every base row, the one-step values are their own
pass). The objective must give the same loss and the same parameter gradients from the same draws.
"""

import pytest
import torch

from twinflow.method import Teacher, TwinFlowConfig, TwinFlowObjective
from twinflow.method.conditioning import expand_cond, take_cond
from twinflow.method.losses import time_weight
from twinflow.method.targets import enhance_velocity, noisy, rcgm_target, rectify_loss, velocity_gap
from twinflow.method.times import normal, sample_times, uniform
from twinflow.method.toy import ToyVelocityMLP
from twinflow.method.twinflow import RECTIFY_ROW_SHARE


def plain_step(obj, model, teacher, x0, cond, null, g):
    cfg, B = obj.config, x0.shape[0]
    split = obj.split(B)
    E, C, V, base = split.e2e, split.cfg, split.adv, split.base
    nE, nV = split.size("e2e"), split.size("adv")
    rectify = nE > 0 and cfg.kappa > 0
    # The draws, in the objective's documented order.
    t, r = sample_times(split, generator=g)
    eps = normal(x0.shape, device="cpu", generator=g)
    eps_fake = normal((nV, *x0.shape[1:]), device="cpu", generator=g)
    if rectify:
        tau = uniform((nE,), device="cpu", generator=g)
        noise_r = normal((nE, *x0.shape[1:]), device="cpu", generator=g)
    cfg_model = model if teacher.is_online else teacher
    rollout_model = teacher if teacher.mode == "ema" else model
    ones, zeros = torch.ones(B), torch.zeros(B)
    with torch.no_grad():
        x_fake = eps_fake - model(eps_fake, ones[:nV], zeros[:nV], take_cond(cond, V))
        x_clean = torch.cat([x0[base], x_fake])
        x_t = noisy(x_clean, t, eps)
        v = eps - x_clean
        v_base = v[base].clone()
        if cond and cfg.enhanced_ratio > 0:
            tc = t[C]
            pred_c = cfg_model(x_t[C], tc, tc, take_cond(cond, C))
            pred_n = cfg_model(x_t[C], tc, tc, expand_cond(null, tc.shape[0]))
            v_base[C] = enhance_velocity(v[C], tc, pred_c, pred_n, cfg.enhanced_ratio, cfg.cfg_interval)
        if rectify:
            x_g = eps[E] - model(eps[E], ones[:nE], zeros[:nE], take_cond(cond, E))
            y = noisy(x_g, tau, noise_r)
            cond_e = take_cond(cond, E)
            dv = velocity_gap(model(y, -tau, -tau, cond_e), model(y, tau, tau, cond_e))
    G = model(x_t, t, r, cond)
    target = torch.cat(
        [
            rcgm_target(
                G[base],
                x_t[base],
                v_base,
                t[base],
                r[base],
                take_cond(cond, base),
                rollout_model,
                delta=cfg.delta,
                order=cfg.rollout_order,
            ),
            v[V],
        ]
    )
    weight = time_weight(t, r)
    weight[V] = 1.0
    loss = (obj.row_loss(G, target) * weight).mean()
    if rectify:
        loss = loss + cfg.kappa * rectify_loss(G[E], dv, obj.row_loss).sum() / (RECTIFY_ROW_SHARE * B)
    return loss


def _loss_and_grads(model, step):
    model.zero_grad(set_to_none=True)
    loss = step()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "kw, conditional",
    [
        ({"teacher": "online"}, True),
        ({"teacher": "online"}, False),
        ({"teacher": "online", "rollout_order": 1}, True),
        ({"teacher": "online", "rollout_order": 3, "lambda": 0.3}, True),
        ({"teacher": "ema"}, True),
        ({"teacher": "frozen"}, True),
        ({"teacher": "online", "lambda": 0.0}, True),
        ({"teacher": "online", "kappa": 0.0}, True),
        ({"teacher": "online", "cfg_interval": (0.3, 0.7), "loss": "mse"}, True),
    ],
)
def test_objective_equals_the_plain_unbatched_step(kw, conditional):
    cfg = TwinFlowConfig.model_validate(kw)
    torch.manual_seed(0)
    model = ToyVelocityMLP(num_classes=4 if conditional else 0)
    obj = TwinFlowObjective(cfg)
    teacher = Teacher(model, cfg.teacher, decay=0.5)
    teacher.update()
    with torch.no_grad():  # the online model moves away from its EMA / frozen copy
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    B = 24
    x0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(1))
    cond = (
        {"label": torch.randint(0, 4, (B,), generator=torch.Generator().manual_seed(2))}
        if conditional
        else {}
    )
    null = model.null_cond()

    def batched():
        g = torch.Generator().manual_seed(3)
        return obj(model, x0, cond, teacher=teacher, null_cond=null, generator=g, update_teacher=False).loss

    loss, grads = _loss_and_grads(model, batched)
    ref_loss, ref_grads = _loss_and_grads(
        model, lambda: plain_step(obj, model, teacher, x0, cond, null, torch.Generator().manual_seed(3))
    )
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
