"""Any-step sampler: the same model samples in 1, 2, 4 ... NFE (the NFE knob) or as an ODE.

Grid for K NFE: u = linspace(g0, 1 - g1, K) (g1 == 0: K + 1 points, last dropped), warp
u <- (1 - (1 - u^a)^b)^c, t_k = 1 - u_k, then t = 0 appended. Step k queries F = G(x, t_k, r_k) with
r_k = 0 ("few"), t_{k+1} ("any") or t_k ("mul", an Euler ODE step), and re-noises the clean estimate:
x <- (1 - t_{k+1}) x_hat + t_{k+1} (sqrt(1 - rho) eps_hat + sqrt(rho) xi).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from twinflow.method.conditioning import cat_cond, cond_batch_size, cond_to, expand_cond
from twinflow.method.objective import VelocityModel
from twinflow.method.times import normal

Style = Literal["few", "any", "mul"]
STYLES: tuple[str, ...] = ("few", "any", "mul")


def time_grid(
    nfe: int, *, g0: float = 0.001, g1: float = 0.5, warp: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> Tensor:
    """The nfe + 1 times t_0 > ... > t_{nfe} = 0 (float64)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    if not (0.0 <= g0 < 1.0 and 0.0 <= g1 < 1.0 and g0 <= 1.0 - g1):
        raise ValueError(f"need 0 <= g0 <= 1 - g1 with g0, g1 in [0, 1), got g0={g0}, g1={g1}")
    if g1 == 0.0:
        u = torch.linspace(g0, 1.0, nfe + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(g0, 1.0 - g1, nfe, dtype=torch.float64)
    a, b, c = warp
    u = (1 - (1 - u**a) ** b) ** c
    return torch.cat([1 - u, torch.zeros(1, dtype=torch.float64)])


@dataclass(frozen=True)
class SamplerSettings:
    nfe: int = 1
    style: Style = "few"
    rho: float = 1.0
    g0: float = 0.001
    g1: float = 0.5
    warp: tuple[float, float, float] = (1.0, 1.0, 1.0)
    guidance: float = 0.0

    def grid(self) -> Tensor:
        return time_grid(self.nfe, g0=self.g0, g1=self.g1, warp=self.warp)


def preset(nfe: int | str) -> SamplerSettings:
    """Reference settings: 1 NFE {0.999}, 2 NFE {0.999, 0.6}, 4 NFE {0.999, 0.833, 0.667, 0.5}
    (few style, rho = 1); "multistep" is the ODE baseline (mul style, rho = 0, 50 steps)."""
    if nfe == "multistep":
        return SamplerSettings(nfe=50, style="mul", rho=0.0, g0=0.0, g1=0.0)
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"preset needs a positive NFE or 'multistep', got {nfe!r}")
    return SamplerSettings(nfe=nfe, style="few", rho=1.0, g0=0.001, g1=0.6 if nfe == 2 else 0.5)


def _guided(
    model: VelocityModel,
    x: Tensor,
    t: Tensor,
    r: Tensor,
    cond: Mapping[str, Tensor],
    null_cond: Mapping[str, Tensor] | None,
    guidance: float,
) -> Tensor:
    if guidance == 0.0:
        return model(x, t, r, dict(cond))
    if null_cond is None or not cond:
        raise ValueError("guidance > 0 needs a conditional model and null_cond")
    B = x.shape[0]
    out = model(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r]), cat_cond([cond, expand_cond(null_cond, B)])
    )
    f_c, f_u = out[:B], out[B:]
    return f_c + guidance * (f_c - f_u)


RowGroups = Sequence[tuple[int, torch.Generator]]


def seeded_noise(rows: int, shape: Sequence[int], seed: int) -> Tensor:
    """The initial noise of `rows` samples from `seed` (CPU float32, so every device draws the same);
    the re-noising generator of the same sample set is `renoise_generator(seed)`. Every caller that
    samples from a seed (eval, tune, serve, the demo, training's grids) uses this pair."""
    return torch.randn((rows, *shape), generator=torch.Generator().manual_seed(int(seed)))


def renoise_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed) + 1)


SeedRows = Sequence[tuple[int, int]]


class SeedStream:
    """One seed's sample set sampled in consecutive chunks (memory-sized batches): each call takes the
    next rows of the seed's noise and continues its re-noising stream, so the initial noise of every
    row depends on the seed and the row only, never on the chunk size (common random numbers)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.pos = int(seed), 0
        self.renoise = renoise_generator(seed)

    def take(self, rows: int, shape: Sequence[int]) -> Tensor:
        noise = seeded_noise(self.pos + rows, shape, self.seed)[self.pos :]
        self.pos += rows
        return noise


@torch.no_grad()
def sample_seeded(
    model: VelocityModel,
    cond: Mapping[str, Tensor] | None,
    settings: SamplerSettings,
    seeds: int | SeedRows | SeedStream,
    *,
    rows: int | None = None,
    null_cond: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Samples from seeds: the one call Serve, eval, tune, training's grids and the demo make, so the
    same model, condition, seed and settings give the same images everywhere.

    `seeds`: one seed for all rows (`rows` of them, default the condition's batch size),
    [(rows, seed), ...] giving consecutive rows their own seed (Serve's requests in one batch: each
    gets exactly the images it gets alone), or a `SeedStream` (the next rows of one seed's set). A seed's initial noise is `seeded_noise` and its re-noising
    stream `renoise_generator` (CPU generators, so every device draws the same numbers). The model's
    first parameter decides device and dtype; `null_cond` (CFG) is moved there."""
    param = next(model.parameters())  # type: ignore[attr-defined]
    device, dtype = param.device, param.dtype
    n = rows if rows is not None else cond_batch_size(dict(cond or {}))
    shape = tuple(model.sample_shape)  # type: ignore[attr-defined]
    if isinstance(seeds, (int, SeedStream)) and n is None:
        raise ValueError("an unconditional sample from one seed needs rows=")
    if isinstance(seeds, SeedStream):
        noise, groups = seeds.take(int(n), shape), [(int(n), seeds.renoise)]
    else:
        pairs = [(int(n), seeds)] if isinstance(seeds, int) else list(seeds)
        noise = torch.cat([seeded_noise(k, shape, seed) for k, seed in pairs])
        groups = [(k, renoise_generator(seed)) for k, seed in pairs]
    noise = noise.to(device, dtype)
    cond = cond_to(cond or {}, device, dtype)
    if null_cond is not None:
        null_cond = cond_to(null_cond, device, dtype)
    return sample(
        model,
        noise,
        cond,
        settings=settings,
        null_cond=null_cond,
        row_groups=groups,
    )


def _fresh_noise(
    shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None, groups: RowGroups | None
) -> Tensor:
    if groups is None:
        return normal(shape, device=device, generator=generator)
    if sum(n for n, _ in groups) != shape[0]:
        raise ValueError(f"row_groups cover {sum(n for n, _ in groups)} rows, the batch has {shape[0]}")
    return torch.cat([normal((n, *shape[1:]), device=device, generator=g) for n, g in groups])


@torch.no_grad()
def sample(
    model: VelocityModel,
    noise: Tensor,
    cond: Mapping[str, Tensor] | None = None,
    *,
    settings: SamplerSettings | None = None,
    null_cond: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    row_groups: RowGroups | None = None,
    grid: Tensor | None = None,
) -> Tensor:
    """Samples from initial noise (B, ...); returns the last clean estimate x_hat (float32).
    `guidance` w: F = F_c + w (F_c - F_null); 0 by default since CFG is baked in by training.
    Fresh noise comes from `generator`, or with `row_groups` [(rows, generator), ...] each group of
    consecutive rows draws from its own generator: several requests batched together then get exactly
    the images each gets alone (Serve's per-request determinism)."""
    s = settings or SamplerSettings()
    if s.style not in STYLES:
        raise ValueError(f"unknown sampling style {s.style!r}; choose one of {list(STYLES)}")
    if not 0.0 <= s.rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {s.rho}")
    if generator is not None and row_groups is not None:
        raise ValueError("pass either generator or row_groups, not both")
    cond = dict(cond or {})
    ts = (grid if grid is not None else s.grid()).tolist()
    B, dev, dtype = noise.shape[0], noise.device, noise.dtype
    x = noise.float()
    keep, fresh = math.sqrt(1.0 - s.rho), math.sqrt(s.rho)
    x_hat = x
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        r_cur = {"few": 0.0, "any": t_next, "mul": t_cur}[s.style]
        t_vec = torch.full((B,), t_cur, device=dev)
        r_vec = torch.full((B,), r_cur, device=dev)
        F = _guided(model, x.to(dtype), t_vec, r_vec, cond, null_cond, s.guidance).float()
        x_hat = x - t_cur * F
        if t_next == 0.0:
            break
        eps_hat = x + (1.0 - t_cur) * F
        noise_part = keep * eps_hat
        if fresh > 0:
            noise_part = noise_part + fresh * _fresh_noise(tuple(x.shape), dev, generator, row_groups)
        x = (1.0 - t_next) * x_hat + t_next * noise_part
    return x_hat


def settings_for(
    method: str | None,
    nfe: int | str,
    style: Style | None = None,
    rho: float | None = None,
    *,
    guidance: float = 0.0,
) -> SamplerSettings:
    """The one place a sampler is chosen (eval, tune, serve, training's grids, the demo).

    A flow-matching model only knows r = t: its ODE with `nfe` uniform Euler steps ("mul", rho = 0),
    with CFG `guidance` (its `sample_guidance`). TwinFlow (any lambda) uses the reference few-step
    presets (`preset`), at guidance 0 unless told otherwise (its CFG is baked into training).
    `style`/`rho` override the choice (tune's evaluation axes)."""
    if method == "flow_matching" and nfe != "multistep":
        s = SamplerSettings(nfe=int(nfe), style="mul", rho=0.0, g0=0.0, g1=0.0)
    else:
        s = preset(nfe if nfe == "multistep" else int(nfe))
    changes: dict = {"guidance": float(guidance)}
    if style is not None:
        changes["style"] = style
    if rho is not None:
        changes["rho"] = float(rho)
    return replace(s, **changes)
