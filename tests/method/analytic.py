"""Small analytic velocity models shared by the method tests."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn


class Recorder(nn.Module):
    """Wraps a velocity model and records every call (inputs, output, whether grad was on)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        out = self.inner(x, t, r, cond)
        self.calls.append(
            {
                "x": x.detach().clone(),
                "t": t.clone(),
                "r": r.clone(),
                "cond": {k: v.clone() for k, v in cond.items()},
                "out": out,
                "grad": torch.is_grad_enabled(),
            }
        )
        return out


class LinearVelocity(nn.Module):
    """G = A x + b + c t + d r + (class shift), a tiny model with exact, cheap gradients."""

    def __init__(self, dim: int = 2, num_classes: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(0.3 * torch.randn(dim, dim, generator=g))
        self.b = nn.Parameter(0.1 * torch.randn(dim, generator=g))
        self.c = nn.Parameter(0.2 * torch.randn(dim, generator=g))
        self.d = nn.Parameter(0.2 * torch.randn(dim, generator=g))
        self.label = (
            nn.Parameter(0.5 * torch.randn(num_classes + 1, dim, generator=g)) if num_classes else None
        )

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        out = x @ self.A.T + self.b + t[:, None] * self.c + r[:, None] * self.d
        if self.label is not None:
            out = out + self.label[cond["label"]]
        return out


def gaussian_velocity(x: Tensor, t: Tensor, mean: float) -> Tensor:
    """Exact E[eps - x0 | x_t = x] for x0 ~ N(mean, 1) in 1-D on the path (1 - t) x0 + t eps."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    var = (1 - t) ** 2 + t**2
    return (2 * t - 1) * (x - (1 - t) * mean) / var - mean


class TwinGaussians(nn.Module):
    """A perfect 'twin' critic: t > 0 is the real N(0, 1) flow, t < 0 the fake N(fake_mean, 1) flow."""

    def __init__(self, fake_mean: float) -> None:
        super().__init__()
        self.fake_mean = fake_mean

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        real = gaussian_velocity(x, t.abs(), 0.0)
        fake = gaussian_velocity(x, t.abs(), self.fake_mean)
        return torch.where((t < 0).view(-1, *([1] * (x.dim() - 1))), fake, real)


class DiracFlow(nn.Module):
    """Exact average velocity when the data is the single point x_star: (x - x_star) / |t|,
    the same for every r (all paths are straight lines through x_star)."""

    def __init__(self, x_star: Tensor) -> None:
        super().__init__()
        self.register_buffer("x_star", x_star)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        return (x - self.x_star) / t.abs().view(-1, *([1] * (x.dim() - 1)))
