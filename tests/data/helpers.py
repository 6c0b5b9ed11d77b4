"""Hand-made shard folders (with deliberately broken records) for the bad-data tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from twinflow.data import shards


def png(value: int, size: int = 8, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), value if mode == "L" else (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def good_row(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"r{i:03d}",
        "image": png(10 * (i % 20)),
        "caption": f"a test square number {i}",
        "label": i % 10,
        **extra,
    }


def write_dataset(
    root: Path,
    rows: list[dict[str, Any]],
    shard_size: int,
    *,
    kind: str = "image_text",
    split: str = "train",
    embedding: dict[str, Any] | None = None,
) -> shards.Manifest:
    """Write ``rows`` as shards + manifest exactly as the builder would (checksums included)."""
    schema = shards.schema_for(kind, embedded=embedding is not None)
    writer = shards.ShardWriter(str(root), split, schema, shard_size)
    for row in rows:
        writer.add(row)
    info = writer.close()
    manifest = shards.Manifest(
        name="handmade",
        kind=kind,
        columns={f.name: str(f.type) for f in schema},
        image_format="png",
        image_mode="L",
        image_size=[8, 8],
        splits={split: info},
        embedding=embedding,
    )
    shards.write_manifest(str(root), manifest)
    return manifest


def cached_row(i: int, dim: int = 6, length: int = 3, **extra: Any) -> dict[str, Any]:
    """A row of an embedding cache with known states: token t, feature d = i + t / 10 + d / 100."""
    states = (i + np.arange(length)[:, None] / 10 + np.arange(dim)[None] / 100).astype(np.float32)
    return {**good_row(i), "text_states": states.tobytes(), "text_len": length, **extra}


def cache_embedding(dim: int = 6, max_length: int = 4, text_column: str = "caption") -> dict[str, Any]:
    return {
        "source_digest": "handmade",
        "encoder_dir": "default",
        "max_length": max_length,
        "text_column": text_column,
        "dtype": "float32",
        "dim": dim,
        "bad": {},
    }


def cached_edit_row(i: int) -> dict[str, Any]:
    """An edit pair (source = level i, target = inverted) with cached instruction states."""
    return {
        **cached_row(i),
        "source_image": png(10 * (i % 20)),
        "image": png(255 - 10 * (i % 20)),
        "instruction": "invert the image",
        "edit": '{"op": "invert"}',
    }
