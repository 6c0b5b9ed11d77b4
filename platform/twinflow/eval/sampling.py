"""How evaluation samples: the NFE list, the sampler per checkpoint, and deterministic noise per unit.

Plain torch, shared by the in-process `evaluate_generator` and the Ray Data actors of `twinflow eval`,
so both produce the same images for the same (seed, sample position, NFE).

Samplers:
- `few`: TwinFlow's presets (`twinflow.method.sampler.preset`): 1 NFE {0.999}, 2 NFE {0.999, 0.6},
  4 NFE {0.999, 0.833, 0.667, 0.5}, r = 0, rho = 1. What a TwinFlow (or lambda = 0) model is for.
- `ode`: K uniform Euler steps of the probability-flow ODE from t = 1 at r = t ("mul" style, rho = 0):
  a flow-matching base's own sampler, and its best use of K NFE.
- `auto`: `ode` for checkpoints whose export says `method: flow_matching`, else `few`.
Both are `twinflow.method.sampler.settings_for` of the method they stand for (`SAMPLER_METHODS`), the
choice Serve and the demo make for the same export; `sample_seeded` is the one sampling call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from twinflow.method.sampler import SamplerSettings, sample_seeded

SAMPLERS = ("auto", "few", "ode")
MAX_NFE = 1000
# An evaluation setting (nfe, style, rho) at this style and rho stands for the model's own sampler.
OWN_STYLE, OWN_RHO = "few", 1.0


def check_nfe(nfe_list: Sequence[Any]) -> list[int]:
    """Validate an NFE list (ints >= 1, or strings like "1,2,4"); returns sorted unique ints."""
    if isinstance(nfe_list, str):
        nfe_list = [p for p in nfe_list.replace(" ", "").split(",") if p]
    out = []
    for n in nfe_list:
        try:
            v = int(n)
            if str(n).strip() != str(v) and not isinstance(n, int):
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(
                f"bad NFE {n!r}: each NFE is a whole number of model evaluations, e.g. 1,2,4,50"
            ) from None
        if isinstance(n, bool) or not 1 <= v <= MAX_NFE:
            raise ValueError(f"bad NFE {n!r}: must be between 1 and {MAX_NFE}")
        out.append(v)
    if not out:
        raise ValueError("empty NFE list; give e.g. 1,2,4")
    return sorted(set(out))


#: the method whose sampler each of eval's sampler names stands for (`settings_for` that method)
SAMPLER_METHODS = {"few": "twinflow", "ode": "flow_matching"}


def resolve_sampler(sampler: str, method: str | None) -> str:
    """`auto` -> the checkpoint's own (`ode` for a flow-matching export, else `few`); validates names."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if sampler != "auto":
        return sampler
    return "ode" if method == "flow_matching" else "few"


@dataclass(frozen=True)
class SampleUnit:
    """Rows [start, stop) of the flat sample list, sampled together with their own seed."""

    start: int
    stop: int
    seed: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_units(n: int, batch_size: int, seed: int) -> list[SampleUnit]:
    """Chunks of `batch_size` rows; each unit's seed depends only on `seed` and its index."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return [
        SampleUnit(s, min(s + batch_size, n), seed * 1_000_003 + i)
        for i, s in enumerate(range(0, n, batch_size))
    ]


@torch.no_grad()
def sample_unit(
    model: torch.nn.Module,
    unit: SampleUnit,
    cond: Mapping[str, Tensor],
    settings: SamplerSettings,
    *,
    device: torch.device | str = "cpu",
    codec: Any = None,
    null_cond: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Images (unit.size, C, H, W) in [-1, 1] from the unit's seed (`seeded_noise`): the same noise for a
    unit at every setting. Latent models need `codec` (the export's VAE) to decode; `settings.guidance`
    > 0 (a base's CFG) needs `null_cond`."""
    out = sample_seeded(model, cond, settings, unit.seed, rows=unit.size, null_cond=null_cond)
    if getattr(model, "latent", None):
        if codec is None:
            raise ValueError("this generator works in a VAE latent space; pass the export's codec to decode")
        out = codec.decode(out)
    return out.float().clamp(-1, 1)
