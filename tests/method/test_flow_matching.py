import pytest
import torch

from twinflow.method import FlowMatchingConfig, FlowMatchingObjective, NonFiniteLossError

from .analytic import LinearVelocity, Recorder


def test_flow_matching_loss_by_hand():
    rec = Recorder(LinearVelocity())
    x0 = torch.randn(6, 2)
    out = FlowMatchingObjective()(rec, x0, {}, teacher=None, generator=torch.Generator().manual_seed(0))
    (call,) = rec.calls
    assert call["grad"] and torch.equal(call["t"], call["r"]) and out.model_calls == 1
    t, x_t, G = call["t"], call["x"], call["out"].detach()
    eps = (x_t - (1 - t)[:, None] * x0) / t[:, None]
    assert out.loss.item() == pytest.approx(((G - (eps - x0)) ** 2).mean().item(), rel=1e-4)
    assert set(out.metrics) >= {"loss_fm", "total"}


def test_condition_dropout_uses_the_null_condition():
    rec = Recorder(LinearVelocity(num_classes=3))
    obj = FlowMatchingObjective(FlowMatchingConfig(cond_dropout=0.5))
    cond = {"label": torch.zeros(400, dtype=torch.long)}
    obj(
        rec,
        torch.randn(400, 2),
        cond,
        teacher=None,
        null_cond={"label": torch.tensor([3])},
        generator=torch.Generator().manual_seed(0),
    )
    labels = rec.calls[0]["cond"]["label"]
    assert set(labels.tolist()) == {0, 3} and 150 < int((labels == 3).sum()) < 250
    with pytest.raises(ValueError, match="null_cond"):
        obj(rec, torch.randn(4, 2), {"label": torch.zeros(4, dtype=torch.long)}, teacher=None)


def test_non_finite_guard():
    class Bad(LinearVelocity):
        def forward(self, x, t, r, cond):
            return super().forward(x, t, r, cond) * float("inf")

    with pytest.raises(NonFiniteLossError):
        FlowMatchingObjective()(Bad(), torch.randn(4, 2), {}, teacher=None)
