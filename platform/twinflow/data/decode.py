"""Shard rows -> training arrays, the same code for the Ray Data stage and the local iterator.

Rows that cannot be used (null column, empty text, undecodable image, broken cached states) come back
as BadRecords next to the good rows; the caller decides how to count them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from twinflow.data.bad_records import BadRecord
from twinflow.data.images import load_chw


@dataclass(frozen=True)
class DecodeSpec:
    image_size: int
    channels: int
    crop: str = "center"
    seed: int = 0
    text_column: str = "caption"
    edit_pairs: bool = False
    text_max_length: int = 32
    text_dim: int = 384
    cached_dtype: str | None = None  # rows carry cached text states of this dtype

    @classmethod
    def for_data(cls, cfg: Any, kind: str, embedding: Mapping[str, Any] | None = None) -> DecodeSpec:
        """The spec a data config (`DataConfig`) asks for on shards of `kind`; `embedding`: the
        manifest's embedding-cache record when the rows carry cached text states."""
        return cls(
            image_size=cfg.image_size,
            channels=cfg.channels,
            crop=cfg.crop,
            seed=cfg.shuffle_seed,
            text_column=cfg.text_column,
            edit_pairs=kind == "edit_pairs",
            text_max_length=cfg.text_max_length,
            text_dim=int(embedding["dim"]) if embedding else 384,
            cached_dtype=embedding["dtype"] if embedding else None,
        )


def unpack_states(
    blob: bytes, length: int, max_length: int, dtype: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Compact cached states (length x dim, ``dtype``) -> zero-padded float32 (L, dim) and mask (L)."""
    flat = np.frombuffer(blob, dtype=np.dtype(dtype))
    if length <= 0 or flat.size % length:
        raise ValueError(f"{flat.size} values do not split into {length} tokens")
    dim = flat.size // length
    states = np.zeros((max_length, dim), np.float32)
    n = min(length, max_length)
    states[:n] = flat.reshape(length, dim)[:n]
    mask = np.zeros(max_length, np.int64)
    mask[:n] = 1
    return states, mask, dim


def _get(batch: Mapping[str, Sequence[Any]], col: str, i: int) -> Any:
    values = batch.get(col)
    return None if values is None else values[i]


def _label(value: Any) -> int:
    if value is None:
        return -1
    try:
        f = float(value)
    except (TypeError, ValueError):
        return -1
    return -1 if f != f else int(f)  # NaN (a null int through numpy) -> -1


def decode_rows(
    batch: Mapping[str, Sequence[Any]], spec: DecodeSpec
) -> tuple[dict[str, np.ndarray], list[BadRecord]]:
    """Decode a column batch; returns (arrays of the good rows, bad records)."""
    ids = batch.get("id")
    n = len(ids) if ids is not None else len(next(iter(batch.values()), []))
    text_col = spec.text_column
    needed = ["image", "caption", text_col] + (["source_image", "instruction"] if spec.edit_pairs else [])
    needed += ["text_states", "text_len"] if spec.cached_dtype else []
    needed = list(dict.fromkeys(needed))
    out: dict[str, list[Any]] = {k: [] for k in ("id", "caption", "label", "image")}
    if spec.edit_pairs:
        out.update(source_image=[], instruction=[])
    if spec.cached_dtype:
        out.update(text_states=[], text_mask=[])
    bad: list[BadRecord] = []
    for i in range(n):
        rid = _get(batch, "id", i)
        rid = str(rid) if rid is not None else f"<row without id #{i}>"
        missing = [c for c in needed if _get(batch, c, i) is None]
        if rid.startswith("<row without id"):
            missing.insert(0, "id")
        if missing:
            bad.append(BadRecord("missing_column", rid, f"null {', '.join(missing)}"))
            continue
        text = _get(batch, text_col, i)
        if not isinstance(text, str) or not text.strip():
            bad.append(BadRecord("empty_caption", rid, f"empty {text_col}"))
            continue
        try:
            image = load_chw(
                _get(batch, "image", i), spec.image_size, spec.channels, spec.crop, rid, spec.seed
            )
            source = (
                load_chw(
                    _get(batch, "source_image", i), spec.image_size, spec.channels, spec.crop, rid, spec.seed
                )
                if spec.edit_pairs
                else None
            )
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken bytes
            bad.append(BadRecord("decode_error", rid, f"{type(exc).__name__}: {exc}"[:200]))
            continue
        if spec.cached_dtype:
            try:
                states, mask, _ = unpack_states(
                    _get(batch, "text_states", i),
                    int(_get(batch, "text_len", i)),
                    spec.text_max_length,
                    spec.cached_dtype,
                )
            except (ValueError, TypeError) as exc:
                bad.append(BadRecord("decode_error", rid, f"cached text states: {exc}"))
                continue
            out["text_states"].append(states)
            out["text_mask"].append(mask)
        out["id"].append(rid)
        out["caption"].append(str(_get(batch, "caption", i) or ""))
        out["label"].append(_label(_get(batch, "label", i)))
        out["image"].append(image)
        if spec.edit_pairs:
            out["source_image"].append(source)
            out["instruction"].append(str(_get(batch, "instruction", i)))
    return _stack(out, spec), bad


def _stack(out: dict[str, list[Any]], spec: DecodeSpec) -> dict[str, np.ndarray]:
    shape = (0, spec.channels, spec.image_size, spec.image_size)
    arrays: dict[str, np.ndarray] = {}
    for key, values in out.items():
        if key in ("image", "source_image"):
            arrays[key] = (
                np.stack(values).astype(np.float32, copy=False) if values else np.zeros(shape, np.float32)
            )
        elif key == "text_states":
            arrays[key] = (
                np.stack(values) if values else np.zeros((0, spec.text_max_length, spec.text_dim), np.float32)
            )
        elif key == "text_mask":
            arrays[key] = np.stack(values) if values else np.zeros((0, spec.text_max_length), np.int64)
        elif key == "label":
            arrays[key] = np.asarray(values, dtype=np.int64)
        else:
            arrays[key] = np.asarray(values, dtype=object)
    return arrays
