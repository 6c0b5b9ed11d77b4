"""Streaming a latent cache (`twinflow data cache` output) into training: `image` = the latent
(C, h, w), `source_image` = the source latent for edit pairs, `text_states`/`text_mask` padded to
`data.text_max_length`; neither the VAE nor the text encoder is loaded. Imported by
`build_train_dataset` when a manifest records `embedding.latent` (building lives in latent_cache.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from twinflow.data import shards
from twinflow.data.bad_records import BadDataError, BadRecord
from twinflow.data.decode import unpack_states
from twinflow.data.reader import open_split

DTYPE = "float32"  # latents and text states are stored exactly as the models return them


def cache_schema(edit: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("label", pa.int32()),
        pa.field("latent", pa.binary()),
        pa.field("text_states", pa.binary()),
        pa.field("text_len", pa.int32()),
    ]
    if edit:
        fields += [pa.field("source_latent", pa.binary()), pa.field("instruction", pa.string())]
    return pa.schema(fields)


def is_latent_cache(manifest: shards.Manifest) -> bool:
    return bool((manifest.embedding or {}).get("latent"))


def decode_cached(
    batch: dict[str, np.ndarray], shape: list[int], max_length: int, edit: bool
) -> dict[str, np.ndarray]:
    """Cached rows -> training arrays: `image` (C, h, w) latents, padded `text_states`, `text_mask`."""
    out: dict[str, list[Any]] = {
        k: [] for k in ("id", "caption", "label", "image", "text_states", "text_mask")
    }
    if edit:
        out.update(source_image=[], instruction=[])
    bad = []
    for i, rid in enumerate(batch["id"]):
        try:
            states, mask, _ = unpack_states(
                batch["text_states"][i], int(batch["text_len"][i]), max_length, DTYPE
            )
            image = np.frombuffer(batch["latent"][i], dtype=DTYPE).reshape(shape)
            source = np.frombuffer(batch["source_latent"][i], dtype=DTYPE).reshape(shape) if edit else None
        except (ValueError, TypeError) as exc:
            bad.append(BadRecord("decode_error", str(rid), f"cached latent/text states: {exc}"[:200]))
            continue
        out["id"].append(str(rid))
        out["caption"].append(str(batch["caption"][i] or ""))
        out["label"].append(-1 if batch["label"][i] is None else int(batch["label"][i]))
        out["image"].append(image)
        out["text_states"].append(states)
        out["text_mask"].append(mask)
        if edit:
            out["source_image"].append(source)
            out["instruction"].append(str(batch["instruction"][i]))
    if bad:  # rows were checked when the cache was made: a broken one here is a corrupted cache
        raise BadDataError(
            f"latent cache rows do not decode ({len(bad)}; first: {bad[0].id}: {bad[0].detail})"
        )
    arrays = {k: np.asarray(v, dtype=object) for k, v in out.items() if k in ("id", "caption", "instruction")}
    arrays["label"] = np.asarray(out["label"], dtype=np.int64)
    for k in ("image", "source_image", "text_states", "text_mask"):
        if k in out:
            arrays[k] = np.stack(out[k]) if out[k] else np.zeros((0, *shape), np.float32)
    return arrays


def latent_train_dataset(cfg, manifest: shards.Manifest | None = None):
    """The training dataset of a latent cache (lazy, like `build_train_dataset`, which checks first
    that the cache fits `cfg`: `data.compatibility.check_latent_cache`). `manifest`: the cache's, when
    the caller has read it."""
    import ray  # `twinflow data --help` imports this module (through data.latent_cache) Ray-free

    manifest = manifest or shards.read_manifest(cfg.path, cfg.s3_endpoint)
    emb = manifest.embedding
    edit = manifest.kind == "edit_pairs"
    columns = [f.name for f in cache_schema(edit)]
    source = open_split(
        cfg.path, cfg.split, cfg.s3_endpoint, cfg.verify_shards, columns=tuple(columns), manifest=manifest
    )
    missing = sum(r.weight for r in source.bad)
    if missing > cfg.max_bad_fraction * max(source.expected, 1) or not source.usable:
        raise BadDataError(
            f"{cfg.path}: {missing} of {source.expected} cached records unreadable "
            f"({', '.join(r.id for r in source.bad[:3])})"
        )
    paths = list(source.paths)
    if cfg.shuffle != "none":
        paths = [paths[i] for i in np.random.default_rng(cfg.shuffle_seed).permutation(len(paths))]
    ds = ray.data.read_parquet(paths, filesystem=source.fs, columns=columns)
    if cfg.limit:
        ds = ds.limit(cfg.limit)
    if cfg.shuffle == "global":
        ds = ds.random_shuffle(seed=cfg.shuffle_seed)
    return ds.map_batches(
        decode_cached,
        batch_format="numpy",
        batch_size=cfg.decode_batch_size,
        num_cpus=cfg.decode_num_cpus,
        fn_kwargs={"shape": emb["latent"]["shape"], "max_length": cfg.text_max_length, "edit": edit},
    )
