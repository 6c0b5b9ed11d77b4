"""Batch-first condition dicts: concatenate, slice, expand and mix them.

The objective batches no-grad forwards of different row groups (and the CFG null condition) into one
model call, so it must treat `cond` as a batch like `x`. Every helper accepts `{}` (unconditional).
When the same key has different trailing shapes (a 1-token null prompt next to 77-token prompts), the
shorter tensors are zero-padded: for a `(text_states, text_mask)` pair that is exactly padding with
masked-out tokens.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

Cond = dict[str, Tensor]


def cond_batch_size(cond: Mapping[str, Tensor]) -> int | None:
    """Batch size shared by all entries; None for `{}`; a ValueError when entries disagree."""
    sizes = {k: int(v.shape[0]) for k, v in cond.items()}
    if not sizes:
        return None
    if len(set(sizes.values())) != 1:
        raise ValueError(f"cond entries have different batch sizes: {sizes}")
    return next(iter(sizes.values()))


def _pad_to(tensor: Tensor, shape: Sequence[int]) -> Tensor:
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    pad: list[int] = []
    for have, want in reversed(list(zip(tensor.shape[1:], shape))):
        pad += [0, want - have]
    return torch.nn.functional.pad(tensor, pad)


def _common_trailing_shapes(conds: Sequence[Mapping[str, Tensor]]) -> dict[str, tuple[int, ...]]:
    keys = set(conds[0])
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(conds):
        if set(c) != keys:
            raise ValueError(
                f"cannot combine cond dicts with different keys: {sorted(keys)} vs {sorted(c)} (#{i})"
            )
        for k, v in c.items():
            tail = tuple(v.shape[1:])
            if k not in shapes:
                shapes[k] = tail
                continue
            if len(tail) != len(shapes[k]):
                raise ValueError(
                    f"cond[{k!r}] has rank {v.dim()} in one dict and {len(shapes[k]) + 1} in another"
                )
            shapes[k] = tuple(max(a, b) for a, b in zip(shapes[k], tail))
    return shapes


def cat_cond(conds: Sequence[Mapping[str, Tensor]]) -> Cond:
    """Concatenate along the batch dimension (zero-padding trailing dims that differ)."""
    conds = [c for c in conds]
    if not conds:
        return {}
    shapes = _common_trailing_shapes(conds)
    return {k: torch.cat([_pad_to(c[k], shapes[k]) for c in conds], dim=0) for k in shapes}


def take_cond(cond: Mapping[str, Tensor], index: int | slice | Tensor) -> Cond:
    """Rows `index` of every entry (an int keeps the batch dimension)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return {k: v[index] for k, v in cond.items()}


def expand_cond(null_cond: Mapping[str, Tensor], batch_size: int) -> Cond:
    """The null condition repeated to `batch_size` rows (it may already have that many)."""
    n = cond_batch_size(null_cond)
    if n is None:
        return {}
    if n == batch_size:
        return dict(null_cond)
    if n != 1:
        raise ValueError(f"null condition must have batch size 1 or {batch_size}, got {n}")
    return {k: v.expand(batch_size, *v.shape[1:]) for k, v in null_cond.items()}


def mix_cond(cond: Mapping[str, Tensor], null_cond: Mapping[str, Tensor], use_null: Tensor) -> Cond:
    """Row-wise choice between `cond` and the null condition (for condition dropout)."""
    batch = int(use_null.shape[0])
    n = cond_batch_size(cond)
    if n is None:
        return {}
    if n != batch:
        raise ValueError(f"cond has batch size {n}, mask has {batch}")
    null = expand_cond(null_cond, batch)
    shapes = _common_trailing_shapes([cond, null])
    out: Cond = {}
    for k, shape in shapes.items():
        a, b = _pad_to(cond[k], shape), _pad_to(null[k], shape).to(cond[k].dtype)
        mask = use_null.to(a.device).view(batch, *([1] * len(shape)))
        out[k] = torch.where(mask, b, a)
    return out


def cond_to(cond: Mapping[str, Tensor], device: torch.device | str, dtype: torch.dtype | None = None) -> Cond:
    """`cond` on `device`; floating tensors also cast to `dtype` when given (masks keep theirs)."""
    return {
        k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
        for k, v in cond.items()
    }
