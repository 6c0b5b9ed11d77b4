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
    source_records: int = 0  # records in the source split (the permutation's length)

    def selection(self, seed: int, limit: int | None) -> dict:
        """What the manifest records of this split: enough to recompute its records (`split_indices`)."""
        return {
            "source_split": self.source_split,
            "permutation_seed": seed,
            "offset": self.offset,
            "slice": self.available,
            "limit": limit,
            "count": int(len(self.indices)),
            "source_records": self.source_records,
        }


def _permutation(seed: int, source_split: str, n: int) -> np.ndarray:
    # Offset by a hash of the group name so train/test permutations differ even with one seed.
    return np.random.default_rng([seed, sum(map(ord, source_split))]).permutation(n)


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


def plan_splits(
    specs: dict[str, SplitSpec], source_splits: dict[str, int], seed: int, limit: int | None = None
) -> list[SplitPlan]:
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
            raise ValueError(
                f"splits {rest} both take 'the rest' of source split {key!r}; "
                "give all but one a count or fraction"
            )
        want = {
            name: (
                s.count
                if s.count is not None
                else int(round(s.fraction * n))
                if s.fraction is not None
                else None
            )
            for name, s in members
        }
        fixed = sum(v for v in want.values() if v is not None)
        if fixed > n:
            raise ValueError(
                f"splits {[m for m, _ in members]} ask for {fixed} records but source split {key!r} has {n}"
            )
        perm = _permutation(seed, key, n)
        start = 0
        for name, _ in members:
            size = want[name] if want[name] is not None else n - fixed
            if size == 0:
                raise ValueError(f"split {name!r} would be empty (source split {key!r} has {n} records)")
            idx = perm[start : start + size]
            plans.append(SplitPlan(name, key, idx[:limit] if limit else idx, start, size, n))
            start += size
    order = list(specs)
    return sorted(plans, key=lambda p: order.index(p.name))


def split_indices(manifest: dict, split: str, where: str = "manifest") -> np.ndarray:
    """The records (indices into the source split) that a built split was cut from, recomputed from the
    shards' manifest (its `splits.<split>.selection`): the whole slice, before a quick build's `limit`
    (which keeps a prefix of it). Manifests from before `source_records` was recorded work when the
    splits drawing from that source cover it (one of them takes "the rest"); else a ValueError."""
    splits = manifest.get("splits") or {}
    if split not in splits:
        raise ValueError(f"{where}: no split {split!r} (it has {sorted(splits)})")
    sel = splits[split].get("selection") or {}
    missing = [k for k in ("source_split", "permutation_seed", "offset", "slice") if k not in sel]
    if missing:
        raise ValueError(f"{where}: splits.{split}.selection lacks {missing}; rebuild the shards")
    n = sel.get("source_records")
    if n is None:
        n = _covered_source_records(manifest, sel["source_split"], where)
    perm = _permutation(int(sel["permutation_seed"]), sel["source_split"], int(n))
    return perm[int(sel["offset"]) : int(sel["offset"]) + int(sel["slice"])]


def _covered_source_records(manifest: dict, source_split: str, where: str) -> int:
    specs = (manifest.get("pipeline") or {}).get("splits") or {}
    members = {
        name: info["selection"]
        for name, info in manifest["splits"].items()
        if (info.get("selection") or {}).get("source_split") == source_split
    }
    takes_rest = [
        name
        for name in members
        if (specs.get(name) or {}).get("count") is None and (specs.get(name) or {}).get("fraction") is None
    ]
    if not specs or len(takes_rest) != 1:
        raise ValueError(
            f"{where}: cannot tell how many records source split {source_split!r} had (no "
            "selection.source_records and no split taking the rest); rebuild the shards"
        )
    return sum(int(sel["slice"]) for sel in members.values())
