"""The embedding cache: the dataset's shards written back with each row's text-encoder states.

Encoding captions is the dominant data cost when the text encoder is large (7B for the 20B model), and
it is the same work every epoch. The cache is a normal shard folder (same manifest format) whose rows
carry ``text_states`` (valid tokens only, float16 by default) and ``text_len``; streaming from it skips
the encoder entirely. Repeated captions cost little on disk: parquet dictionary-encodes repeated values.
The cache is keyed by the source shards' checksums, the encoder, max_length, text column and dtype; a
stale cache is rebuilt, never silently used.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tqdm import tqdm

from twinflow import storage
from twinflow.data import shards
from twinflow.data.config import DataConfig
from twinflow.data.reader import open_split

log = logging.getLogger("twinflow.data")


def cache_uri(cfg: DataConfig) -> str:
    if cfg.embed_cache_path:
        return cfg.embed_cache_path
    encoder = (
        "minilm"
        if not cfg.text_encoder_dir
        else re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(cfg.text_encoder_dir).name)
    )
    return storage.join(
        cfg.path, "embeddings", f"{encoder}-L{cfg.text_max_length}-{cfg.text_column}-{cfg.embed_cache_dtype}"
    )


def cache_key(cfg: DataConfig, manifest: shards.Manifest) -> dict[str, Any]:
    return {
        "source_digest": manifest.digest(),
        "encoder_dir": cfg.text_encoder_dir or "default",
        "max_length": cfg.text_max_length,
        "text_column": cfg.text_column,
        "dtype": cfg.embed_cache_dtype,
    }


def _read_cache(uri: str, endpoint: str | None) -> shards.Manifest | None:
    try:
        return shards.read_manifest(uri, endpoint)
    except (storage.MissingPathError, ValueError):
        return None


def ensure_embed_cache(cfg: DataConfig, source=None) -> tuple[str, shards.Manifest]:
    """The cache for ``cfg``'s split: reused when current, otherwise built now (logged)."""
    source = source or open_split(cfg.path, cfg.split, cfg.s3_endpoint, cfg.verify_shards)
    uri = cache_uri(cfg)
    existing = _read_cache(uri, cfg.s3_endpoint)
    key = cache_key(cfg, source.manifest)
    if (
        existing
        and existing.embedding
        and _same_key(existing.embedding, key)
        and cfg.split in existing.splits
    ):
        return uri, existing
    log.info("embedding cache %s missing or stale for split %r: building it", uri, cfg.split)
    return uri, build_embed_cache(cfg, source=source)


def _same_key(embedding: dict[str, Any], key: dict[str, Any]) -> bool:
    return all(embedding.get(k) == v for k, v in key.items())


def build_embed_cache(cfg: DataConfig, *, source=None, progress: bool = True) -> shards.Manifest:
    """Encode ``cfg.split``'s text with the actor pool and write the rows back as cache shards."""
    import ray  # only a build needs Ray: data.local and `twinflow data --help` import this module

    from twinflow.data.embed import TextEmbedStage, embed_kwargs  # imports Ray
    from twinflow.data.tracking import make_tracker, tracker_name  # imports Ray

    source = source or open_split(cfg.path, cfg.split, cfg.s3_endpoint, cfg.verify_shards)
    if not source.usable:
        raise storage.MissingPathError(f"{cfg.path}: split {cfg.split!r} has no readable shards to embed")
    uri = cache_uri(cfg)
    storage.makedirs(uri, cfg.s3_endpoint)
    key = cache_key(cfg, source.manifest)
    tracker = make_tracker(
        tracker_name(cfg, "embed-cache"),
        source.expected,
        cfg.max_bad_fraction,
        f"records embedded from {cfg.split}",
    )
    tracker.report(list(source.bad))
    # Keep the other splits of a current cache; drop the manifest while this split is rewritten, so an
    # interrupted build leaves no manifest pointing at half-written shards.
    existing = _read_cache(uri, cfg.s3_endpoint)
    keep = existing if existing and existing.embedding and _same_key(existing.embedding, key) else None
    if existing:
        fs, base = storage.open_filesystem(uri, cfg.s3_endpoint)
        fs.delete_file(f"{base}/{shards.MANIFEST}")
    storage.delete_dir(storage.join(uri, cfg.split), cfg.s3_endpoint)
    ds = ray.data.read_parquet(source.paths, filesystem=source.fs)
    ds = ds.map_batches(
        TextEmbedStage,
        batch_format="pyarrow",
        batch_size=cfg.embed_batch_size,
        fn_constructor_kwargs=embed_kwargs(
            cfg, compact=True, cache_dtype=cfg.embed_cache_dtype, tracker=tracker
        ),
        compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors),
        num_cpus=cfg.embed_num_cpus,
        num_gpus=cfg.embed_num_gpus or None,
    )
    kind = source.manifest.kind
    shard_size = max((s.count for s in source.manifest.split(cfg.split).shards), default=5000)
    writer = shards.ShardWriter(
        uri, cfg.split, shards.schema_for(kind, embedded=True), shard_size, cfg.s3_endpoint
    )
    dim = None
    itemsize = 2 if cfg.embed_cache_dtype == "float16" else 4
    with tqdm(
        total=source.expected, disable=not progress, unit="rec", desc=f"embed {cfg.split}", mininterval=0.5
    ) as bar:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if dim is None and batch.num_rows:
                blob, n = batch.column("text_states")[0].as_py(), batch.column("text_len")[0].as_py()
                dim = len(blob) // itemsize // n
            writer.add_table(batch)
            bar.update(batch.num_rows)
    info = writer.close()
    info.selection = {"embedded_from": cfg.path, "split": cfg.split}
    splits = {k: v for k, v in keep.splits.items() if k != cfg.split} if keep else {}
    all_bad = {k: v for k, v in keep.embedding.get("bad", {}).items() if k in splits} if keep else {}
    reports = {k: v for k, v in keep.bad_records.items() if k in splits} if keep else {}
    splits[cfg.split] = info
    all_bad[cfg.split] = tracker.records()
    reports[cfg.split] = tracker.summary()
    src = source.manifest
    manifest = shards.Manifest(
        name=f"{src.name}-embeddings",
        kind=kind,
        columns={f.name: str(f.type) for f in shards.schema_for(kind, embedded=True)},
        image_format=src.image_format,
        image_mode=src.image_mode,
        image_size=src.image_size,
        seed=src.seed,
        source={**src.source, "embedded_from": cfg.path, "dataset_name": src.name},
        pipeline=src.pipeline,
        splits=splits,
        bad_records=reports,
        embedding={**key, "dim": dim or 0, "bad": all_bad},
    )
    shards.write_manifest(uri, manifest, cfg.s3_endpoint)
    log.info("wrote embedding cache %s: %d records of %s", uri, info.count, cfg.split)
    return manifest
