"""Cut output splits (train / held-out eval ...) from a source's own splits, reproducibly.

Records of one source split are permuted with the pipeline seed; the output splits drawing from it take
consecutive, disjoint slices of that permutation in declaration order. So a held-out eval split never
shares a record with train, and `limit` (a quick build) takes a prefix of each slice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from twinflow.data.config import SplitSpec

ALL = "all"


@dataclass
class SplitPlan:
    name: str
    source_split: str
    indices: np.ndarray  # into the source split
    offset: int  # where this slice starts in the permutation
    available: int  # size of the slice before `limit`

    def selection(self, seed: int, limit: int | None) -> dict:
        return {"source_split": self.source_split, "permutation_seed": seed, "offset": self.offset,
                "slice": self.available, "limit": limit, "count": int(len(self.indices))}


def _source_records(source_splits: dict[str, int], wanted: str | None) -> tuple[str, int]:
    if wanted is None:
        if len(source_splits) == 1:
            only = next(iter(source_splits))
            return only, source_splits[only]
        return ALL, sum(source_splits.values())
    if wanted not in source_splits:
        raise ValueError(f"source_split {wanted!r} does not exist; the source has {sorted(source_splits)}")
    return wanted, source_splits[wanted]


def global_to_source(source_splits: dict[str, int], split: str, index: int) -> tuple[str, int]:
    """Map an index of the pseudo split 'all' (source splits concatenated in order) to (split, index)."""
    if split != ALL or ALL in source_splits:
        return split, index
    for name, n in source_splits.items():
        if index < n:
            return name, index
        index -= n
    raise IndexError("index past the end of the source")


def plan_splits(specs: dict[str, SplitSpec], source_splits: dict[str, int], seed: int,
                limit: int | None = None) -> list[SplitPlan]:
    groups: dict[str, list[tuple[str, SplitSpec]]] = {}
    sizes: dict[str, int] = {}
    for name, spec in specs.items():
        key, size = _source_records(source_splits, spec.source_split)
        groups.setdefault(key, []).append((name, spec))
        sizes[key] = size
    plans: list[SplitPlan] = []
    for key, members in groups.items():
        n = sizes[key]
        rest = [name for name, s in members if s.count is None and s.fraction is None]
        if len(rest) > 1:
            raise ValueError(f"splits {rest} both take 'the rest' of source split {key!r}; "
                             "give all but one a count or fraction")
        want = {name: (s.count if s.count is not None else
                       int(round(s.fraction * n)) if s.fraction is not None else None) for name, s in members}
        fixed = sum(v for v in want.values() if v is not None)
        if fixed > n:
            raise ValueError(f"splits {[m for m, _ in members]} ask for {fixed} records but source split "
                             f"{key!r} has {n}")
        # Offset by a hash of the group name so train/test permutations differ even with one seed.
        perm = np.random.default_rng([seed, sum(map(ord, key))]).permutation(n)
        start = 0
        for name, _ in members:
            size = want[name] if want[name] is not None else n - fixed
            if size == 0:
                raise ValueError(f"split {name!r} would be empty (source split {key!r} has {n} records)")
            idx = perm[start:start + size]
            plans.append(SplitPlan(name, key, idx[:limit] if limit else idx, start, size))
            start += size
    order = list(specs)
    return sorted(plans, key=lambda p: order.index(p.name))
