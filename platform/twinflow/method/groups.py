"""Split a micro-batch into the four TwinFlow row groups (E2E, MUL, ANY, ADV), contiguously.

Contiguous groups keep every per-group operation a slice (no gathers, no data-dependent shapes), and
the order e2e, mul, any, adv puts the rows that need the RCGM target (e2e, mul, any) first.
"""

from __future__ import annotations

import math
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
    """The reference's rule for one micro-batch: sizes proportional to the weights (Python `round`),
    remainder to the last non-empty group; every group with a positive weight gets at least one row.
    Training realises the shares over the global batch with `global_split` instead."""
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


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def global_split(
    rows: int, *, lambda_: float | None = None, weights: Mapping[str, float] | None = None
) -> GroupSplit:
    """Group sizes over an optimizer step's global batch of `rows`.

    lambda: round(lambda x rows) TwinFlow rows (E2E gets the odd one, then ADV), the rest to MUL and ANY
    (MUL gets the odd one); at least one row in each group lambda makes non-empty, so the realised
    share is within half a row of lambda x rows whenever the batch can hold it (`realises`).
    weights: largest remainders (every group within one row of its share), at least one row per
    positive weight."""
    if (lambda_ is None) == (weights is None):
        raise ValueError("give exactly one of lambda_ or weights")
    if weights is None:
        lam = float(lambda_)  # type: ignore[arg-type]
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {lam}")
        active = (2 if lam > 0 else 0) + (2 if lam < 1 else 0)
        if rows < active:
            raise ValueError(
                f"a global batch of {rows} rows is too small for {active} non-empty groups: "
                f"it needs at least {active} rows"
            )
        twin = _half_up(lam * rows)
        if lam > 0:
            twin = max(twin, 2)
        if lam < 1:
            twin = min(twin, rows - 2)
        base = rows - twin
        e2e, mul = (twin + 1) // 2, (base + 1) // 2
        return GroupSplit((e2e, mul, base - mul, twin - e2e))
    split = split_groups(rows, weights=weights)  # validates the weights and the minimum size
    w = [float(weights.get(k, 0.0)) for k in GROUP_NAMES]
    share = [x / sum(w) * rows for x in w]
    sizes = [max(1, int(math.floor(s))) if x > 0 else 0 for s, x in zip(share, w)]
    while sum(sizes) > rows:  # minimums took rows: give them back from the largest surplus
        j = max(range(4), key=lambda k: (sizes[k] - share[k]) if sizes[k] > 1 else -math.inf)
        sizes[j] -= 1
    order = sorted(range(4), key=lambda k: (-(share[k] - sizes[k]), k))
    for k in order[: rows - sum(sizes)]:
        sizes[k] += 1
    assert sum(sizes) == rows == split.batch_size
    return GroupSplit(tuple(sizes))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BatchLayout:
    """How an optimizer step's global batch is laid out: `ranks` x `accumulation` micro-batches (slots)
    of `micro_batch` rows. Slot k = micro-batch index * ranks + rank."""

    ranks: int = 1
    micro_batch: int = 1
    accumulation: int = 1

    @property
    def slots(self) -> int:
        return self.ranks * self.accumulation

    @property
    def global_rows(self) -> int:
        return self.slots * self.micro_batch

    def slot(self, rank: int, micro: int) -> int:
        return (micro % self.accumulation) * self.ranks + rank


def deal_rows(total: GroupSplit, layout: BatchLayout, offset: int) -> list[GroupSplit]:
    """Each slot's group sizes when the global split `total` is dealt over the slots: global row i
    (groups in order e2e, mul, any, adv) goes to slot (i + offset) mod slots, so every slot gets exactly
    `micro_batch` rows and each group is spread as evenly as it can be (slots differ by at most one row
    per group). `offset` (from the seed and step) rotates which slots carry a group's remainder."""
    if total.batch_size != layout.global_rows:
        raise ValueError(f"split of {total.batch_size} rows for a global batch of {layout.global_rows}")
    n = layout.slots
    counts = [[0, 0, 0, 0] for _ in range(n)]
    i = 0
    for g, size in enumerate(total.sizes):
        for _ in range(size):
            counts[(i + offset) % n][g] += 1
            i += 1
    return [GroupSplit(tuple(c)) for c in counts]  # type: ignore[arg-type]


def realises(
    split: GroupSplit, *, lambda_: float | None = None, weights: Mapping[str, float] | None = None
) -> bool:
    """Whether `split` gives the asked shares within one row: lambda's TwinFlow rows (E2E + ADV) within
    one of lambda x rows, or every group within one row of its weighted share."""
    rows = split.batch_size
    if lambda_ is not None:
        return abs(split.size("e2e") + split.size("adv") - lambda_ * rows) <= 1.0
    w = [float((weights or {}).get(k, 0.0)) for k in GROUP_NAMES]
    return all(abs(n - x / sum(w) * rows) <= 1.0 for n, x in zip(split.sizes, w))


def smallest_batch(
    *, lambda_: float | None = None, weights: Mapping[str, float] | None = None, limit: int = 4096
) -> int | None:
    """The smallest global batch from which every larger one (up to `limit`) realises the shares."""
    ok_from = None
    for rows in range(limit, 0, -1):
        try:
            split = global_split(rows, lambda_=lambda_, weights=weights)
            good = realises(split, lambda_=lambda_, weights=weights)
        except ValueError:  # fewer rows than non-empty groups
            good = False
        if not good:
            break
        ok_from = rows
    return ok_from
