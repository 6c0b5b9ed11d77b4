import math

import pytest
import torch

from twinflow.method import NonFiniteLossError, Teacher, TwinFlowConfig, TwinFlowObjective
from twinflow.method.losses import barron_loss, mse_loss
from twinflow.method.targets import noisy, rectify_loss, velocity_gap

from .analytic import LinearVelocity, Recorder, TwinGaussians


def _cfg(**kw) -> TwinFlowConfig:
    return TwinFlowConfig.model_validate(kw)


def _run(cfg, *, B=16, conditional=True, teacher_mode=None, seed=0, model=None):
    inner = model or LinearVelocity(num_classes=4 if conditional else 0)
    rec = Recorder(inner)
    obj = TwinFlowObjective(cfg)
    teacher = Teacher(rec, teacher_mode or cfg.teacher, decay=cfg.ema_decay)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=g)
    cond = {"label": torch.randint(0, 4, (B,), generator=g)} if conditional else {}
    null = {"label": torch.tensor([4])} if conditional else None
    out = obj(rec, x0, cond, teacher=teacher, null_cond=null, generator=g)
    return out, rec, x0, teacher


@pytest.mark.parametrize(
    "kw, conditional, calls, online_sizes, teacher_sizes",
    [
        # online teacher: stage A (fake 4 + CFG pair 2*8), rollout sub-step 1 (nK), the grad forward
        # (G: 16 rows), then the rectify pair on its E2E rows (2*4) + the last rollout sub-step (nK):
        # N + 2 calls. K stands for nK: the base rows with t - r >= delta, the only ones whose residual
        # reads the rollout.
        ({"teacher": "online"}, True, 4, [20, "K", "G", "8+K"], []),
        ({"teacher": "online"}, False, 4, [4, "K", "G", "8+K"], []),
        ({"teacher": "online", "rollout_order": 3}, True, 5, [20, "K", "K", "G", "8+K"], []),
        ({"teacher": "online", "rollout_order": 1}, True, 3, [20, "G", "8+K"], []),
        # EMA teacher (its own copy): stage A and the last stage are two calls each: N + 4.
        ({"teacher": "ema"}, True, 6, [4, "G", 8], [16, "K", "K"]),
        # Frozen teacher: only the CFG pair is the frozen copy's; the rollout runs on the online model.
        ({"teacher": "frozen"}, True, 5, [4, "K", "G", "8+K"], [16]),
        ({"teacher": "frozen"}, False, 4, [4, "K", "G", "8+K"], []),
        # No rectify pair (lambda = 0 or kappa = 0): the grad forward is the last call.
        # lambda = 0: no fake samples either; unconditional: no CFG pair either.
        ({"teacher": "online", "lambda": 0.0}, True, 4, [32, "K", "K", "G"], []),
        ({"teacher": "online", "lambda": 0.0}, False, 3, ["K", "K", "G"], []),
        ({"teacher": "online", "kappa": 0.0}, False, 4, [4, "K", "K", "G"], []),
    ],
)
def test_call_count_and_batching(kw, conditional, calls, online_sizes, teacher_sizes):
    cfg = _cfg(**kw)
    out, rec, _, teacher = _run(cfg, conditional=conditional)
    teacher_calls = [] if teacher.is_online else teacher.module.calls
    (grad_call,) = [c for c in rec.calls if c["grad"]]  # exactly one call with gradient
    t, r = grad_call["t"], grad_call["r"]
    base = slice(0, 16 - cfg.split(16).size("adv"))
    nK = int(((t[base] - r[base]) >= cfg.delta).sum())
    assert 0 < nK < base.stop  # this seed leaves some near-instantaneous MUL rows out of the rollout
    size = {"K": nK, "8+K": 8 + nK, "G": 16}
    assert out.model_calls == calls == len(rec.calls) + len(teacher_calls)
    assert [c["x"].shape[0] for c in rec.calls] == [size.get(n, n) for n in online_sizes]
    assert [c["x"].shape[0] for c in teacher_calls] == [size.get(n, n) for n in teacher_sizes]
    nograd = [size.get(n, n) for n in online_sizes if n != "G"] + [size.get(n, n) for n in teacher_sizes]
    assert out.nograd_rows == sum(nograd)
    assert out.metrics["model_calls"] == calls
    # The call with gradient is the online one marked G, over all B rows.
    assert [c["grad"] for c in rec.calls] == [n == "G" for n in online_sizes]
    assert not any(c["grad"] or c["out"].requires_grad for c in teacher_calls)
    assert all(c["out"].requires_grad == c["grad"] for c in rec.calls)
    assert math.isfinite(out.loss.item())


def test_gradient_equals_the_hand_computed_one():
    """Replays the step from the recorded calls with the formulas of the method doc; the loss
    gradient w.r.t. G must match, and the parameter gradient must flow through G alone."""
    cfg = _cfg(teacher="online", loss="mse", kappa=0.5, rollout_order=2)
    B, delta, n_el = 8, cfg.delta, 2
    out, rec, x0, _ = _run(cfg, B=B, conditional=False, seed=3)
    c0, c1, c2, c3 = rec.calls  # stage A, rollout sub-step 1, grad, rectify pair + last sub-step
    t, r, x_t, G = c2["t"], c2["r"], c2["x"], c2["out"]
    E, base, V = slice(0, 2), slice(0, 6), slice(6, 8)
    assert torch.all(t[E] == 1) and torch.all(t[V] < 0) and t[2:6].min() > 0.02

    x_fake = c0["x"] - c0["out"]
    s = -t[V]
    v_adv = (x_t[V] - x_fake) / s[:, None]  # eps - x_fake, eps recovered from x_s
    assert torch.allclose(x_t[V], (1 - s)[:, None] * x_fake + s[:, None] * (v_adv + x_fake), atol=1e-5)
    v = (x_t[base] - x0[base]) / t[base][:, None]  # eps - x0 from x_t = (1-t) x0 + t eps

    # Only rows whose residual reads D are rolled out; this seed leaves some out.
    keep = ((t[base] - r[base]) >= delta).nonzero().flatten()
    nK = len(keep)
    assert 0 < nK < 6 and c1["x"].shape[0] == nK and c3["x"].shape[0] == 4 + nK
    assert torch.allclose(c1["t"], torch.maximum(t[base] - delta, r[base])[keep])
    assert torch.allclose(c1["x"], (x_t[base] - delta * v)[keep], atol=1e-5)
    s0, s1, s2 = c1["t"], c1["r"], c3["r"][4:]
    assert torch.allclose(c3["t"][4:], s1) and torch.allclose(s2, r[base][keep])
    assert torch.allclose(c3["x"][4:], c1["x"] - (s0 - s1)[:, None] * c1["out"], atol=1e-6)
    D = torch.zeros_like(v)
    D[keep] = (s0 - s1)[:, None] * c1["out"] + (s1 - s2)[:, None] * c3["out"][4:]
    tau = c3["t"][2:4]
    assert torch.allclose(c3["t"][:2], -tau) and torch.allclose(c3["x"][:2], c3["x"][2:4])
    dv = (c3["out"][:2] - c3["out"][2:4]).clamp(-1, 1)

    Gd = G.detach()
    gap = (t[base] - r[base])[:, None]
    R = torch.where(gap >= delta, (gap * Gd[base] - (delta * v + D)) / delta, Gd[base] - v)
    target = torch.cat([Gd[base] - R.clamp(-1, 1), v_adv])
    w = 1 + torch.tan(0.4 * math.pi * (1 - (t.abs() - r.abs())))
    w[V] = 1.0
    expected = 2 * w[:, None] * (Gd - target) / (B * n_el)
    expected[E] += cfg.kappa * 2 * dv / (2 * n_el)

    (dG,) = torch.autograd.grad(out.loss, G, retain_graph=True)
    assert torch.allclose(dG, expected, atol=2e-5, rtol=1e-4)
    params = list(rec.inner.parameters())
    total = torch.autograd.grad(out.loss, params, retain_graph=True)
    via_G = torch.autograd.grad(G, params, grad_outputs=dG)
    for a, b in zip(total, via_G):
        assert torch.allclose(a, b, atol=1e-6)
    # Loss value too: weighted MSE mean + kappa * rectify.
    value = (w * ((Gd - target) ** 2).mean(1)).mean() + cfg.kappa * (dv**2).mean()
    assert out.loss.item() == pytest.approx(value.item(), rel=1e-4)


def test_dv_sign_on_1d_gaussians_moves_samples_toward_the_real_mean():
    """Real N(0,1), fake N(1.5,1): E[dv] < 0 and a descent step on L_rect lowers the fake mean."""
    g = torch.Generator().manual_seed(0)
    n = 20000
    critic = TwinGaussians(fake_mean=1.5)
    for loss_fn in (mse_loss, barron_loss):
        b = torch.tensor(1.5, requires_grad=True)  # one-step generator: x_g = eps - G_e, G_e = -b
        eps = torch.randn(n, 1, generator=g)
        G_e = (-b).expand(n, 1)
        x_g = (eps - G_e).detach()
        tau = torch.rand(n, generator=g)
        y = noisy(x_g, tau, torch.randn(n, 1, generator=g))
        dv = velocity_gap(critic(y, -tau, -tau, {}), critic(y, tau, tau, {}))
        assert dv.mean() < -0.5
        assert dv.max() <= 1.0 and dv.min() >= -1.0
        rectify_loss(G_e, dv, loss_fn).mean().backward()
        with torch.no_grad():
            b_new = b - 0.1 * b.grad
        assert b.grad > 0 and 0 < b_new < 1.5
        assert abs((eps + b_new).mean()) < abs((eps + 1.5).mean())


def test_teacher_is_updated_once_per_call_before_targets():
    cfg = _cfg(teacher="ema", ema_decay=0.9)
    model = LinearVelocity()
    teacher = Teacher(model, "ema", decay=0.9)
    obj = TwinFlowObjective(cfg)
    x0 = torch.randn(8, 2)
    with torch.no_grad():
        model.b.add_(1.0)  # the online model moved since the teacher was built
    obj(model, x0, {}, teacher=teacher, generator=torch.Generator().manual_seed(0))
    assert teacher.ema.num_updates == 1
    assert torch.equal(teacher.module.b, model.b)  # first update copies, and happened before targets
    obj(model, x0, {}, teacher=teacher, update_teacher=False)
    assert teacher.ema.num_updates == 1


def test_lambda_zero_never_touches_the_fake_branch():
    out, rec, _, _ = _run(_cfg(**{"lambda": 0.0}), conditional=True)
    assert all(torch.all(c["t"] >= 0) for c in rec.calls)
    assert set(out.metrics) >= {"loss_mul", "loss_any", "total"}
    assert not {"loss_e2e", "loss_adv", "loss_rect"} & set(out.metrics)


def test_cfg_pair_uses_cond_and_null_at_r_equals_t():
    out, rec, _, _ = _run(_cfg(teacher="online"), conditional=True)
    first = rec.calls[0]  # stage A: 4 fake-sample rows, then the CFG pair (2 x 8)
    pair_t = first["t"][4:]
    assert torch.equal(first["r"][4:], pair_t)
    assert torch.all(first["cond"]["label"][12:] == 4) and torch.all(first["cond"]["label"][4:12] < 4)
    assert torch.equal(first["x"][4:12], first["x"][12:])


def test_cfg_changes_the_loss_only_through_the_target():
    kw = {"teacher": "online", "lambda": 0.0}
    a, _, _, _ = _run(_cfg(enhanced_ratio=0.0, **kw), seed=5)
    b, _, _, _ = _run(_cfg(enhanced_ratio=0.8, **kw), seed=5)
    assert a.model_calls == 3 and b.model_calls == 4
    assert a.loss.item() != pytest.approx(b.loss.item(), rel=1e-3)


def test_reproducible_with_a_generator():
    a = _run(_cfg(), seed=1)[0].loss.item()
    b = _run(_cfg(), seed=1)[0].loss.item()
    c = _run(_cfg(), seed=2)[0].loss.item()
    assert a == b and a != c


def test_no_nan_when_t_equals_r(monkeypatch):
    import twinflow.method.twinflow as tw

    def equal_times(split, device="cpu", generator=None):
        t = torch.linspace(0.0, 1.0, split.batch_size)
        t[split.adv] = -t[split.adv]
        return t, t.clone()

    monkeypatch.setattr(tw, "sample_times", equal_times)
    out, rec, _, _ = _run(_cfg(teacher="online"), conditional=False)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in [torch.tensor(x) for x in out.metrics.values()])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in rec.inner.parameters())


class _NaNOnFake(LinearVelocity):
    def forward(self, x, t, r, cond):
        out = super().forward(x, t, r, cond)
        return torch.where((t < 0)[:, None], torch.full_like(out, float("nan")), out)


def test_non_finite_loss_raises_or_is_reported():
    with pytest.raises(NonFiniteLossError, match="loss_adv=nan"):
        _run(_cfg(), conditional=False, model=_NaNOnFake())
    out, _, _, _ = _run(_cfg(on_nonfinite="report"), conditional=False, model=_NaNOnFake())
    assert out.metrics["nonfinite"] == 1.0 and math.isnan(out.metrics["loss_adv"])
    ok, _, _, _ = _run(_cfg(on_nonfinite="report"), conditional=False)
    assert "nonfinite" not in ok.metrics


def test_bad_inputs_are_clear_errors():
    obj = TwinFlowObjective(_cfg())
    model = LinearVelocity(num_classes=4)
    x0 = torch.randn(8, 2)
    cond = {"label": torch.zeros(8, dtype=torch.long)}
    with pytest.raises(ValueError, match="needs null_cond"):
        obj(model, x0, cond, teacher=None)
    with pytest.raises(ValueError, match="cond has batch size 3"):
        obj(model, x0, {"label": torch.zeros(3, dtype=torch.long)}, teacher=None, null_cond={})
    with pytest.raises(ValueError, match="at least 4 rows"):
        obj(LinearVelocity(), torch.randn(3, 2), {}, teacher=None)


def test_bf16_autocast_keeps_targets_in_float32():
    from twinflow.method.toy import ToyVelocityMLP

    model = ToyVelocityMLP(num_classes=4)
    obj = TwinFlowObjective(_cfg(teacher="ema"))
    teacher = obj.make_teacher(model)
    x0 = torch.randn(16, 2)
    cond = {"label": torch.randint(0, 4, (16,))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(
            model,
            x0,
            cond,
            teacher=teacher,
            null_cond=model.null_cond(),
            generator=torch.Generator().manual_seed(0),
        )
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_frozen_teacher_answers_the_cfg_pair_and_the_online_model_the_rollout():
    """Reference behaviour: the frozen base never learned jumps (r < t), so RCGM's rollout queries the
    online model (no grad); only the CFG pair (r = t) comes from the frozen copy."""
    out, rec, _, teacher = _run(_cfg(teacher="frozen"), B=16, conditional=True)
    frozen_calls = teacher.module.calls
    assert len(frozen_calls) == 1 and frozen_calls[0]["x"].shape[0] == 16  # CFG pair, 2 x 8 rows
    assert torch.equal(frozen_calls[0]["t"], frozen_calls[0]["r"])
    rollout_rows = [c for c in rec.calls if not c["grad"] and torch.any(c["r"] < c["t"])]
    assert rollout_rows, "the rollout (r < t) must run on the online model"
    assert all(not c["out"].requires_grad for c in rollout_rows)
    # The frozen copy really is the initial model: moving the online weights does not move it.
    with torch.no_grad():
        rec.inner.b.add_(1.0)
    assert not torch.equal(teacher.module.inner.b, rec.inner.b)


class _SignVelocity(torch.nn.Module):
    """G = c * sign(t): fake (t < 0) and real (t > 0) answers differ by a constant, so dv = clip(-2c)
    is the same for every E2E row whatever the noise."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.linspace(0.2, 0.3, dim))

    def forward(self, x, t, r, cond):
        return torch.sign(t)[:, None] * self.c + 0.0 * x


@pytest.mark.parametrize("loss", ["mse", "barron"])
def test_rectify_push_per_e2e_row_does_not_depend_on_lambda(monkeypatch, loss):
    """At fixed B, dL/dG on an E2E row from the rectify term equals the reference's (kappa * 4/B per
    row) for every lambda; a plain mean over the E2E rows would scale it by 2 / lambda."""
    import twinflow.method.twinflow as tw

    B, kappa = 40, 0.5
    real_rectify = tw.rectify_loss
    grads = {}
    for lam in (0.15, 1 / 3, 0.5, 0.75):
        cfg = _cfg(teacher="online", loss=loss, kappa=kappa, **{"lambda": lam})
        per_lambda = []
        for scale in (1.0, 0.0):  # the same draws with and without the rectify term
            monkeypatch.setattr(
                tw, "rectify_loss", lambda G_e, dv, fn, s=scale: s * real_rectify(G_e, dv, fn)
            )
            rec = Recorder(_SignVelocity())
            out = TwinFlowObjective(cfg)(
                rec,
                torch.randn(B, 2, generator=torch.Generator().manual_seed(1)),
                {},
                teacher=None,
                generator=torch.Generator().manual_seed(2),
            )
            (G,) = [c["out"] for c in rec.calls if c["grad"]]
            per_lambda.append(torch.autograd.grad(out.loss, G)[0])
        nE = cfg.split(B).size("e2e")
        rect = (per_lambda[0] - per_lambda[1])[:nE]
        assert torch.count_nonzero((per_lambda[0] - per_lambda[1])[nE:]) == 0
        grads[lam] = rect
    dv = (-2 * _SignVelocity().c).clamp(-1, 1)
    if loss == "mse":  # d/dG mean((G - (G - dv))^2) = 2 dv / D, times kappa * 4 / B
        expected = kappa * 4 / B * 2 * dv / 2
        for lam, g in grads.items():
            assert torch.allclose(g, expected.expand_as(g), atol=1e-7), lam
    ref = grads[0.5][0]
    for lam, g in grads.items():
        assert torch.allclose(g, ref.expand_as(g), rtol=1e-5, atol=1e-9), lam


def test_onestep_diagnostics_show_an_outward_push_and_saturation():
    from twinflow.method.twinflow import onestep_diagnostics

    x_g = torch.tensor([[0.95, -0.5, 0.2, 1.2]])
    out = onestep_diagnostics(x_g, 0.1 * x_g)  # dv along +x_g: outward, cos(dv, -x_g) = -1
    assert out["dv_cos"].item() == pytest.approx(-1.0) and out["sat_onestep"].item() == pytest.approx(0.5)
    assert onestep_diagnostics(x_g, -0.1 * x_g)["dv_cos"].item() == pytest.approx(1.0)
    metrics = _run(_cfg(teacher="online"), conditional=False)[0].metrics
    assert {"dv_abs", "dv_cos", "sat_onestep"} <= set(metrics) and -1 <= metrics["dv_cos"] <= 1
