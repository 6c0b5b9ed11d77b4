"""2-D toy: a small MLP velocity model, an 8-Gaussian ring, energy distance, and a
flow-matching-vs-TwinFlow comparison at an equal budget (same steps, batch and optimizer).

    python -m twinflow.method.toy [--steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from twinflow.method.config import FlowMatchingConfig, TwinFlowConfig
from twinflow.method.flow_matching import FlowMatchingObjective
from twinflow.method.sampler import SamplerSettings, sample, settings_for
from twinflow.method.twinflow import TwinFlowObjective


class TimeEmbedder(nn.Module):
    """Sinusoidal features of a signed time (sin is odd, cos even: -t is distinguishable) + MLP."""

    def __init__(self, dim: int, num_freqs: int = 16, max_freq: float = 64.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), num_freqs)))
        self.mlp = nn.Sequential(nn.Linear(2 * num_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        arg = t.float()[:, None] * self.freqs[None]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))


class ToyVelocityMLP(nn.Module):
    """G(x, t, r | cond) for 2-D points, with the two-time embedding temb = E1(t) + (t - r) E2(r).
    Optional class conditioning: cond = {"label": LongTensor (B,)}; label `num_classes` is the null
    class (use `null_cond()`)."""

    def __init__(
        self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int = 0, e2_init: str = "random"
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.time_embed = TimeEmbedder(hidden)  # E1
        self.time_embed_r = TimeEmbedder(hidden)  # E2
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, dim)
        self.label_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        if e2_init == "copy":
            self.copy_e2_from_e1()
        elif e2_init != "random":
            raise ValueError(f"e2_init must be 'random' or 'copy', got {e2_init!r}")

    @torch.no_grad()
    def copy_e2_from_e1(self) -> None:
        """Make r = t queries reproduce the E1-only model exactly, and r != t start close to it."""
        self.time_embed_r.load_state_dict(self.time_embed.state_dict())

    def null_cond(self) -> dict[str, Tensor]:
        if not self.num_classes:
            return {}
        return {"label": torch.full((1,), self.num_classes, dtype=torch.long, device=self.out.weight.device)}

    def temb(self, t: Tensor, r: Tensor) -> Tensor:
        return self.time_embed(t) + (t - r).float()[:, None] * self.time_embed_r(r)

    def features(self, x: Tensor, temb: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        h = self.inp(x.float()) + temb
        if self.label_embed is not None:
            if "label" not in cond:
                raise ValueError("this toy model is class-conditional: pass cond={'label': ...}")
            h = h + self.label_embed(cond["label"])
        for block in self.blocks:
            h = h + block(nn.functional.silu(h))
        return self.out(nn.functional.silu(h))

    def forward(self, x: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        return self.features(x, self.temb(t, r), cond or {}).to(x.dtype)

    def forward_base(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """The one-time backbone (E1 only): what a pretrained model computes."""
        return self.features(x, self.time_embed(t), cond or {}).to(x.dtype)


def ring_data(
    n: int,
    *,
    modes: int = 8,
    radius: float = 2.0,
    std: float = 0.15,
    generator: torch.Generator | None = None,
    return_labels: bool = False,
):
    """Points from `modes` Gaussians evenly spaced on a circle (labels = mode index)."""
    labels = torch.randint(0, modes, (n,), generator=generator)
    angle = labels.float() * (2 * math.pi / modes)
    centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    x = centers + std * torch.randn(n, 2, generator=generator)
    return (x, labels) if return_labels else x


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within samples); 0 iff same distribution."""
    x, y = x.double(), y.double()
    n, m = x.shape[0], y.shape[0]
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (n * (n - 1))
    yy = torch.cdist(y, y).sum() / (m * (m - 1))
    return float(2 * xy - xx - yy)


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float = 0.5) -> float:
    """Squared MMD with a Gaussian kernel (biased estimate)."""
    x, y = x.double(), y.double()
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth**2)).mean()  # noqa: E731
    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def train_toy(
    objective,
    *,
    steps: int,
    seed: int,
    batch: int = 256,
    lr: float = 1e-3,
    hidden: int = 128,
    depth: int = 3,
    model: ToyVelocityMLP | None = None,
) -> ToyVelocityMLP:
    """Adam at a constant LR; the objective's own teacher (if any) is built from the model."""
    torch.manual_seed(seed)
    model = model if model is not None else ToyVelocityMLP(hidden=hidden, depth=depth)
    teacher = objective.make_teacher(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x0 = ring_data(batch, generator=gen)
        out = objective(model, x0, {}, teacher=teacher, generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model


def evaluate(
    model: nn.Module, settings: Mapping[str, SamplerSettings], *, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Energy distance to fresh data for each sampler setting (same noise for all)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    data = ring_data(n, generator=gen)
    noise = torch.randn(n, 2, generator=gen)
    results = {}
    for name, s in settings.items():
        xs = sample(model, noise, {}, settings=s, generator=torch.Generator().manual_seed(20_000 + seed))
        results[name] = energy_distance(xs, data)
    return results


# Each model with its own sampler (flow matching: uniform Euler steps on its ODE); TwinFlow also at
# 50 NFE on the ODE, to compare with its few-step use.
FM_SETTINGS = {str(n): settings_for("flow_matching", n) for n in (1, 2, 4, 50)}
TWINFLOW_SETTINGS = {
    **{str(n): settings_for("twinflow", n) for n in (1, 2, 4)},
    "50": settings_for("twinflow", "multistep"),
}


def toy_demo(
    steps: int = 600,
    seed: int = 0,
    *,
    batch: int = 256,
    lr: float = 1e-3,
    n_eval: int = 2000,
    twinflow: TwinFlowConfig | None = None,
) -> dict:
    """Train flow matching and TwinFlow from the same init for the same steps; energy distances
    (lower is better) per NFE, plus the data-vs-data floor."""
    fm = train_toy(FlowMatchingObjective(FlowMatchingConfig()), steps=steps, seed=seed, batch=batch, lr=lr)
    tf_cfg = twinflow if twinflow is not None else TwinFlowConfig(loss="mse", teacher="ema", ema_decay=0.99)
    tf = train_toy(TwinFlowObjective(tf_cfg), steps=steps, seed=seed, batch=batch, lr=lr)
    gen = torch.Generator().manual_seed(30_000 + seed)
    floor = energy_distance(ring_data(n_eval, generator=gen), ring_data(n_eval, generator=gen))
    return {
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "flow_matching": evaluate(fm, FM_SETTINGS, n=n_eval, seed=seed),
        "twinflow": evaluate(tf, TWINFLOW_SETTINGS, n=n_eval, seed=seed),
        "data_floor": floor,
    }


def format_table(result: Mapping) -> str:
    cols = ["1", "2", "4", "50"]
    lines = [
        f"2-D ring, {result['steps']} steps x batch {result['batch']}, seed {result['seed']}: "
        "energy distance to data (lower is better)",
        f"{'NFE':<16}" + "".join(f"{c:>10}" for c in cols),
    ]
    for name in ("flow_matching", "twinflow"):
        lines.append(f"{name:<16}" + "".join(f"{result[name][c]:>10.4f}" for c in cols))
    lines.append(f"{'data vs data':<16}{result['data_floor']:>10.4f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twinflow.method.toy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    torch.set_num_threads(1)
    print(format_table(toy_demo(steps=args.steps, seed=args.seed, batch=args.batch)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
