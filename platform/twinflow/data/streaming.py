"""Stream shards into training with Ray Data: read (local or s3) -> decode -> text states -> batches.

``build_train_dataset(cfg)`` returns a lazy ``ray.data.Dataset``; a Ray Train loop consumes its
per-worker shard with ``ray.train.get_dataset_shard("train").iter_torch_batches(**iter_torch_kwargs(cfg),
batch_size=...)``. Rows: ``image`` float32 (C, H, W) in [-1, 1], ``text_states`` float32 (L, D),
``text_mask`` int64 (L), ``caption``, ``id``, ``label`` and, for edit pairs, ``source_image`` and
``instruction``. Bad records are counted by one named actor per data config; see
``bad_record_report``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import ray
from ray.data import RandomSeedConfig
from ray.data.collate_fn import NumpyBatchCollateFn

from twinflow import storage
from twinflow.data import shards
from twinflow.data.bad_records import BadDataError, BadRecord
from twinflow.data.caption_refs import REF_COLUMN, CaptionRefs, open_table, table_name
from twinflow.data.compatibility import check_data_section
from twinflow.data.config import DataConfig
from twinflow.data.decode import DecodeSpec, decode_rows
from twinflow.data.embed import TextEmbedStage, embed_kwargs
from twinflow.data.embed_cache import ensure_embed_cache
from twinflow.data.latent_stream import is_latent_cache, latent_train_dataset
from twinflow.data.reader import open_split
from twinflow.data.safe_read import read_stage
from twinflow.data.tracking import RayTracker, live_tracker, make_tracker, tracker_name

log = logging.getLogger("twinflow.data")


def bad_record_report(cfg: DataConfig, write_to: str | None = None) -> dict[str, Any]:
    """The bad-record summary of the dataset streamed for ``cfg`` (counts per reason with ids), from
    the driver or a worker of the same Ray job; ``write_to`` (local path or s3 URI) also saves it as JSON."""
    name = tracker_name(cfg)
    summary = live_tracker(name).summary()
    if write_to:
        storage.write_bytes(write_to, json.dumps(summary, indent=2).encode(), cfg.s3_endpoint)
    if summary["bad"]:
        log.warning(
            "%s/%s: skipped %d bad records: %s",
            cfg.path,
            cfg.split,
            summary["bad"],
            {k: v["count"] for k, v in summary["by_reason"].items()},
        )
    return summary


def bad_record_metrics(cfg: DataConfig, tracker: RayTracker | None = None) -> dict[str, float]:
    """The streamed split's bad-record counts so far as step metrics: `data/bad_records` and one
    `data/bad_records/<reason>` each; empty when the counter cannot be reached (nothing streamed).
    `tracker`: the counter's handle when the caller has it (a training worker gets the driver's), else
    it is looked up by name."""
    summary = None
    for handle in (tracker, None):  # the given handle, then the counter by name (a rerun's new one)
        try:
            summary = (handle or live_tracker(tracker_name(cfg))).summary()
            break
        except Exception as exc:  # no counter actor in this job (e.g. a local iterator)
            log.debug("bad-record counter %s unavailable: %r", tracker_name(cfg), exc)
    if summary is None:
        return {}
    out = {"data/bad_records": float(summary["bad"])}
    out.update({f"data/bad_records/{k}": float(v["count"]) for k, v in summary["by_reason"].items()})
    return out


def decode_stage(
    batch: dict[str, np.ndarray], spec: DecodeSpec, tracker: RayTracker
) -> dict[str, np.ndarray]:
    out, bad = decode_rows(batch, spec)
    tracker.report(bad)
    return out


def iter_torch_kwargs(cfg: DataConfig, device: Any = "cpu") -> dict[str, Any]:
    """Keyword arguments for ``iter_torch_batches`` that this config decides: the collate function
    (numeric columns -> tensors on ``device``, string columns -> lists of str), prefetching and the
    local shuffle buffer. The caller adds ``batch_size`` (and ``drop_last``)."""
    refs = CaptionRefs(table_name(cfg), cfg.text_max_length)
    kwargs: dict[str, Any] = {
        "collate_fn": TorchBatchCollate(device, refs),
        "prefetch_batches": cfg.prefetch_batches,
    }
    if cfg.shuffle_buffer:
        kwargs.update(local_shuffle_buffer_size=cfg.shuffle_buffer, local_shuffle_seed=cfg.shuffle_seed)
    return kwargs


class TorchBatchCollate(NumpyBatchCollateFn):
    """numpy batch -> dict of torch tensors (numeric columns, on ``device``) and lists of str; caption
    refs (``text_ref``) become ``text_states``/``text_mask`` through ``refs``."""

    def __init__(self, device: Any = "cpu", refs: CaptionRefs | None = None) -> None:
        self.device, self.refs = device, refs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch  # in the train worker only: Ray Data's decode tasks import this module torch-free

        if REF_COLUMN in batch and self.refs is not None:
            batch = dict(batch)
            batch["text_states"], batch["text_mask"] = self.refs.resolve(
                [str(k) for k in batch.pop(REF_COLUMN)]
            )
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if value.dtype == object or value.dtype.kind in "US":
                out[key] = [str(v) for v in value]
            else:
                value = np.ascontiguousarray(value)
                tensor = torch.from_numpy(value if value.flags.writeable else value.copy())
                out[key] = tensor.to(self.device, non_blocking=True) if str(self.device) != "cpu" else tensor
        return out


def _columns(kind: str, available: set[str], cached: bool) -> list[str]:
    """Columns the decode stage reads: the kind's required ones plus optional ones every shard has."""
    cols = list(shards.REQUIRED[kind]) + (["text_states", "text_len"] if cached else [])
    return cols + [c for c in ("label",) if c in available]


def build_train_dataset(cfg: DataConfig, manifest: shards.Manifest | None = None):
    """The training ``ray.data.Dataset`` for ``cfg`` (lazy; nothing runs until it is iterated).
    ``manifest``: ``cfg.path``'s, when the caller has read it (the driver's resolved job).

    Fails up front with one clear error for a missing path, bucket, manifest or split, for data that
    does not fit ``cfg`` (``data.compatibility.check_data_section``), and for more missing shards than
    ``max_bad_fraction`` allows.
    """
    manifest = manifest or shards.read_manifest(cfg.path, cfg.s3_endpoint)
    check_data_section(cfg, manifest)
    if is_latent_cache(manifest):  # `twinflow data cache` output
        return latent_train_dataset(cfg, manifest)
    source = open_split(cfg.path, cfg.split, cfg.s3_endpoint, cfg.verify_shards, manifest=manifest)
    kind = manifest.kind
    upfront = list(source.bad)
    read_from = source
    cache_info = None
    if source.manifest.embedding is not None:
        # ``path`` is itself an embedding cache (e.g. copied next to the cluster): stream it as is.
        cache_info = source.manifest.embedding
        upfront += _cached_bad(source.manifest, cfg.split)
    elif cfg.embed_cache and cfg.embed_text:
        cache_uri, cache_manifest = ensure_embed_cache(cfg, source)
        read_from = open_split(
            cache_uri,
            cfg.split,
            cfg.s3_endpoint,
            cfg.verify_shards,
            columns=tuple(shards.REQUIRED[kind]) + ("text_states", "text_len"),
        )
        cache_info = cache_manifest.embedding
        upfront += _cached_bad(cache_manifest, cfg.split) + read_from.bad

    tracker = make_tracker(
        tracker_name(cfg), source.expected, cfg.max_bad_fraction, f"records in {cfg.split}"
    )
    tracker.report(upfront)  # raises here, before any reading, when missing shards exceed the budget
    if not read_from.usable:
        raise BadDataError(f"{cfg.path}: split {cfg.split!r} has no readable shards")

    ds = read_shards(
        read_from,
        _columns(kind, read_from.columns, cache_info is not None),
        tracker,
        shuffle_seed=cfg.shuffle_seed if cfg.shuffle != "none" else None,
        num_cpus=cfg.decode_num_cpus,
    )
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    if cfg.shuffle == "global":
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    spec = DecodeSpec.for_data(cfg, kind, cache_info)
    ds = ds.map_batches(
        decode_stage,
        fn_kwargs={"spec": spec, "tracker": tracker},
        batch_format="numpy",
        batch_size=cfg.decode_batch_size,
        num_cpus=cfg.decode_num_cpus,
    )
    if cache_info is None and cfg.embed_text:
        # each distinct caption's states once, rows carry refs (twinflow.data.caption_refs)
        refs = CaptionRefs(table_name(cfg), cfg.text_max_length, open_table(table_name(cfg)))
        ds = ds.map_batches(
            TextEmbedStage,
            fn_constructor_kwargs=embed_kwargs(cfg, refs=refs),
            batch_format="numpy",
            batch_size=cfg.embed_batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.embed_actors),
            num_cpus=cfg.embed_num_cpus,
            num_gpus=cfg.embed_num_gpus or None,
        )
    return ds


def read_shards(
    source, columns: list[str], tracker: RayTracker, shuffle_seed: int | None = None, num_cpus: float = 0.5
):
    """One read task per shard, row group by row group (twinflow.data.safe_read): a garbled shard
    becomes counted bad records instead of a failed job. `shuffle_seed`: the shard order is shuffled
    anew for each pass over the data (epoch), from the seed and the pass's index, so it never repeats
    identically every epoch and the same seed replays the same sequence of orders."""
    items = [{"path": p, "shard": s.path, "count": s.count} for p, s in zip(source.paths, source.usable)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if shuffle_seed is not None:
        ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    return ds.map_batches(
        read_stage,
        batch_size=1,
        batch_format="numpy",
        zero_copy_batch=True,
        num_cpus=num_cpus,
        fn_kwargs={"fs": source.fs, "columns": columns, "tracker": tracker},
    )


def _cached_bad(manifest: shards.Manifest, split: str) -> list[BadRecord]:
    return [BadRecord(**r) for r in (manifest.embedding or {}).get("bad", {}).get(split, [])]
