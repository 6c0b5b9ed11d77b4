"""Read shards in-process, without Ray: for unit tests, evaluation and quick looks at a dataset.

Same decoding and bad-record rules as the Ray pipeline (`decode.decode_rows`), same row layout.
"""

from __future__ import annotations

import posixpath
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from twinflow.data import shards
from twinflow.data.bad_records import BadRecordLog
from twinflow.data.config import DataConfig
from twinflow.data.decode import DecodeSpec, decode_rows
from twinflow.data.embed_cache import cache_key, cache_uri
from twinflow.data.reader import SplitShards, open_split

_COLUMNS = ["id", "image", "caption", "label", "source_image", "instruction", "text_states", "text_len"]


def _config(
    data: DataConfig | str, split: str | None, image_size: int | None, channels: int | None
) -> tuple[DataConfig, SplitShards]:
    if isinstance(data, DataConfig):
        cfg = data if split is None else data.model_copy(update={"split": split})
        source = open_split(cfg.path, cfg.split, cfg.s3_endpoint, cfg.verify_shards)
        if cfg.embed_cache and cfg.embed_text and source.manifest.embedding is None:
            cached = _current_cache(cfg, source.manifest)
            if cached is not None:
                return cfg, cached
        return cfg, source
    source = open_split(str(data), split or "train")
    m = source.manifest
    size = image_size or (m.image_size[0] if m.image_size and m.image_size[0] == m.image_size[1] else None)
    if size is None:
        raise ValueError(f"{data}: images differ in size; pass image_size=")
    cfg = DataConfig(
        path=str(data),
        split=split or "train",
        image_size=size,
        channels=channels or (1 if m.image_mode == "L" else 3),
        shuffle="none",
    )
    return cfg, source


def _current_cache(cfg: DataConfig, manifest: shards.Manifest) -> SplitShards | None:
    """The split of ``cfg``'s embedding cache when it exists and is current (building one needs Ray)."""
    try:
        cache = open_split(cache_uri(cfg), cfg.split, cfg.s3_endpoint, cfg.verify_shards)
    except (FileNotFoundError, ValueError):
        return None
    key = cache_key(cfg, manifest)
    return cache if all(cache.manifest.embedding.get(k) == v for k, v in key.items()) else None


def iter_local_batches(
    data: DataConfig | str,
    split: str | None = None,
    *,
    batch_size: int = 256,
    encoder: Any = None,
    bad: BadRecordLog | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Numpy batches shaped like the Ray pipeline's rows; ``text_states``/``text_mask`` come from
    ``encoder`` (a TextEncoder) when given, else from the shards when they are an embedding cache (or
    ``cfg.embed_cache`` is on and a current cache exists).

    ``data`` is a DataConfig, or a shard folder path (then images keep their stored size and mode
    unless ``image_size``/``channels`` say otherwise). Bad records go to ``bad`` (made here when
    None) and raise BadDataError past the config's ``max_bad_fraction``.
    """
    cfg, source = _config(data, split, image_size, channels)
    m = source.manifest
    bad = (
        bad
        if bad is not None
        else BadRecordLog(source.expected, cfg.max_bad_fraction, f"records in {cfg.split}")
    )
    bad.extend(source.bad)
    spec = DecodeSpec.for_data(cfg, m.kind, m.embedding)
    remaining = limit if limit is not None else cfg.limit
    for shard in source.usable:
        pf = pq.ParquetFile(source.fs.open_input_file(posixpath.join(source.base, shard.path)))
        columns = [c for c in _COLUMNS if c in pf.schema_arrow.names]
        for record_batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            out, skipped = decode_rows(record_batch.to_pydict(), spec)
            bad.extend(skipped)
            if remaining is not None:
                out = {k: v[:remaining] for k, v in out.items()}
                remaining -= len(out["id"])
            if encoder is not None and len(out["id"]):
                texts = out["instruction"] if cfg.is_edit else out["caption"]
                enc = encoder.encode([str(t) for t in texts])
                out["text_states"] = enc["text_states"].cpu().numpy().astype(np.float32)
                out["text_mask"] = enc["text_mask"].cpu().numpy().astype(np.int64)
            if len(out["id"]):
                yield out
            if remaining is not None and remaining <= 0:
                return


def iter_local_records(
    data: DataConfig | str, split: str | None = None, **kwargs: Any
) -> Iterator[dict[str, Any]]:
    """One dict per good record (``image`` float32 (C, H, W) in [-1, 1], ``caption``, ``id``, ``label``,
    and ``source_image``/``instruction`` for edit pairs); same arguments as ``iter_local_batches``."""
    for batch in iter_local_batches(data, split, **kwargs):
        for i in range(len(batch["id"])):
            yield {k: v[i] for k, v in batch.items()}


def read_split_manifest(data: DataConfig | str) -> shards.Manifest:
    cfg_path = data.path if isinstance(data, DataConfig) else str(data)
    endpoint = data.s3_endpoint if isinstance(data, DataConfig) else None
    return shards.read_manifest(cfg_path, endpoint)
