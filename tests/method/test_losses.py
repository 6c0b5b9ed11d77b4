import math

import pytest
import torch

from twinflow.method.losses import barron_loss, mse_loss, row_loss, time_weight


def test_time_weight_values():
    t = torch.tensor([1.0, 0.5, 0.5, -0.3, 0.7])
    r = torch.tensor([0.0, 0.5, 0.0, -0.3, 0.2])
    w = time_weight(t, r)
    assert w[0] == pytest.approx(1.0, abs=1e-6)  # full jump
    assert w[1] == pytest.approx(1 + math.tan(0.4 * math.pi), rel=1e-6)  # instantaneous: ~4.078
    assert w[1] == pytest.approx(4.0777, abs=1e-3)
    assert w[2] == pytest.approx(1 + math.tan(0.2 * math.pi), rel=1e-6)
    assert w[3] == pytest.approx(w[1].item())  # |t| - |r| = 0 for signed rows too
    assert w[4] == pytest.approx(1 + math.tan(0.4 * math.pi * 0.5), rel=1e-6)


def test_mse_per_row():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert mse_loss(pred, target).tolist() == [2.5, 5.0]


def test_barron_value_and_normalised_gradient():
    c = 1e-3
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(5, 3, 4, generator=g).requires_grad_(True)
    target = torch.randn(5, 3, 4, generator=g)
    target[0] = pred[0].detach() + 1e-4 * torch.randn(3, 4, generator=g)  # a row with m ~ c^2
    loss = barron_loss(pred, target, c)
    m = ((pred - target) ** 2).flatten(1).mean(1).detach()
    assert torch.allclose(loss, m / c / torch.sqrt(m / c**2 + 1), rtol=1e-5)
    loss.sum().backward()
    n = 12
    expected = 2 * (pred - target).detach() / n / c / torch.sqrt(m / c**2 + 1).view(5, 1, 1)
    assert torch.allclose(pred.grad, expected, rtol=1e-5, atol=1e-9)
    # Large residuals: the gradient is the residual divided by the row RMS (norm ~ 2/sqrt(n)).
    rms = m[1:].sqrt().view(4, 1, 1)
    assert torch.allclose(pred.grad[1:], 2 * (pred - target).detach()[1:] / n / rms, rtol=1e-3)


def test_row_loss_by_name():
    assert row_loss("mse") is mse_loss and row_loss("barron") is barron_loss
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        row_loss("l1")
