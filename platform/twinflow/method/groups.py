"""Split a micro-batch into the four TwinFlow row groups (E2E, MUL, ANY, ADV), contiguously.

Contiguous groups keep every per-group operation a slice (no gathers, no data-dependent shapes), and
the order e2e, mul, any, adv puts the rows that need the RCGM target (e2e, mul, any) first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

GROUP_NAMES: tuple[str, ...] = ("e2e", "mul", "any", "adv")


def weights_from_lambda(lambda_: float) -> dict[str, float]:
    """lambda = share of rows for the TwinFlow groups (E2E, ADV), split equally; the rest to MUL, ANY."""
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lambda_}")
    return {"e2e": lambda_ / 2, "mul": (1 - lambda_) / 2, "any": (1 - lambda_) / 2, "adv": lambda_ / 2}


@dataclass(frozen=True)
class GroupSplit:
    """Row counts per group; group g owns rows [start(g), start(g) + sizes[g])."""

    sizes: tuple[int, int, int, int]

    @property
    def batch_size(self) -> int:
        return sum(self.sizes)

    def size(self, name: str) -> int:
        return self.sizes[GROUP_NAMES.index(name)]

    def slice(self, name: str) -> slice:
        i = GROUP_NAMES.index(name)
        start = sum(self.sizes[:i])
        return slice(start, start + self.sizes[i])

    @property
    def e2e(self) -> slice:
        return self.slice("e2e")

    @property
    def mul(self) -> slice:
        return self.slice("mul")

    @property
    def any(self) -> slice:
        return self.slice("any")

    @property
    def adv(self) -> slice:
        return self.slice("adv")

    @property
    def base(self) -> slice:
        """Rows that get the RCGM base target: e2e, mul and any (they come first)."""
        return slice(0, self.batch_size - self.size("adv"))

    @property
    def cfg(self) -> slice:
        """Rows eligible for the baked-in CFG: mul and any (contiguous)."""
        return slice(self.size("e2e"), self.size("e2e") + self.size("mul") + self.size("any"))

    def as_dict(self) -> dict[str, int]:
        return dict(zip(GROUP_NAMES, self.sizes))


def split_groups(
    batch_size: int, *, lambda_: float | None = None, weights: Mapping[str, float] | None = None
) -> GroupSplit:
    """Sizes proportional to the weights (Python `round`, as the reference), remainder to the last
    non-empty group; every group with a positive weight gets at least one row."""
    if (lambda_ is None) == (weights is None):
        raise ValueError("give exactly one of lambda_ or weights")
    if weights is None:
        weights = weights_from_lambda(float(lambda_))  # type: ignore[arg-type]
    unknown = set(weights) - set(GROUP_NAMES)
    if unknown:
        raise ValueError(f"unknown group names {sorted(unknown)}; expected {list(GROUP_NAMES)}")
    w = [float(weights.get(k, 0.0)) for k in GROUP_NAMES]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"group weights must be >= 0 with a positive sum, got {dict(zip(GROUP_NAMES, w))}")
    active = [i for i, x in enumerate(w) if x > 0]
    if batch_size < len(active):
        names = [GROUP_NAMES[i] for i in active]
        raise ValueError(
            f"batch size {batch_size} is too small for {len(active)} non-empty groups {names}: "
            f"use a micro-batch of at least {len(active)} rows per rank"
        )
    total = sum(w)
    sizes = [0, 0, 0, 0]
    last = active[-1]
    for i in active[:-1]:
        sizes[i] = max(1, round(batch_size * w[i] / total))
    # Keep at least one row for the last group: take rows back from the largest earlier groups.
    while sum(sizes) > batch_size - 1:
        j = max(active[:-1], key=lambda k: (sizes[k], -k))
        sizes[j] -= 1
    sizes[last] = batch_size - sum(sizes)
    return GroupSplit(tuple(sizes))  # type: ignore[arg-type]
