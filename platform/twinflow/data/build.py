"""`twinflow data build`: run a pipeline YAML into parquet shards + manifest (local or s3://)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm import tqdm

from twinflow import storage
from twinflow.data import shards
from twinflow.data.bad_records import BadRecord, BadRecordLog, SkipRecord
from twinflow.data.config import PipelineConfig
from twinflow.data.edits import EditMaker
from twinflow.data.images import encode_image, square
from twinflow.data.sources import make_source
from twinflow.data.splits import global_to_source, plan_splits

log = logging.getLogger("twinflow.data")


@dataclass
class BuildResult:
    uri: str
    manifest: shards.Manifest
    bad: BadRecordLog
    seconds: float

    @property
    def records_per_s(self) -> float:
        return self.manifest.total / self.seconds if self.seconds > 0 else 0.0


def build_pipeline(cfg: PipelineConfig, *, output: str | None = None, progress: bool = True) -> BuildResult:
    """Build every split of ``cfg``; bad source records are skipped and counted (see bad_records)."""
    t0 = time.perf_counter()
    out = output or cfg.output
    endpoint = cfg.s3_endpoint
    storage.makedirs(out, endpoint)  # a missing bucket fails here, before any work
    source = make_source(cfg.source, cfg.seed)
    maker = EditMaker(cfg.edits, cfg.seed, source.mode) if cfg.edits else None
    source_splits = source.splits()
    plans = plan_splits(cfg.splits, source_splits, cfg.seed, cfg.limit)
    expected = sum(len(p.indices) for p in plans)
    bad = BadRecordLog(expected=expected, max_bad_fraction=cfg.max_bad_fraction, what="source records")
    removed = shards.remove_previous(out, endpoint)
    if removed:
        log.info("removed %d shards of an earlier build at %s", removed, out)

    schema = shards.schema_for(cfg.kind)
    sizes: set[tuple[int, int]] = set()
    splits: dict[str, shards.SplitInfo] = {}
    bar = tqdm(total=expected, disable=not progress, unit="rec", desc=f"build {cfg.name}", mininterval=0.5)
    try:
        for plan in plans:
            writer = shards.ShardWriter(out, plan.name, schema, cfg.shard_size, endpoint)
            skipped_edits = 0
            for index in plan.indices:
                bar.update(1)
                split, i = global_to_source(source_splits, plan.source_split, int(index))
                try:
                    item = source.item(split, i)
                except SkipRecord as skip:
                    bad.add(skip.record)
                    continue
                if not item.caption.strip():
                    bad.add(BadRecord("empty_caption", item.id))
                    continue
                image = square(item.image, cfg.image_size) if cfg.image_size else item.image
                sizes.add(image.size)
                data = encode_image(image, cfg.image_format, cfg.jpeg_quality)
                if maker is None:
                    writer.add({"id": item.id, "image": data, "caption": item.caption, "label": item.label})
                    continue
                pairs = maker.make(item.id, image)
                skipped_edits += cfg.edits.per_image - len(pairs)
                for edit, target in pairs:
                    writer.add(
                        {
                            "id": f"{item.id}-{edit.op}",
                            "image": encode_image(target, cfg.image_format, cfg.jpeg_quality),
                            "caption": item.caption,
                            "label": item.label,
                            "source_image": data,
                            "instruction": maker.instruction(item.id, edit, item.name or "image"),
                            "edit": edit.spec(),
                        }
                    )
            info = writer.close()
            info.selection = plan.selection(cfg.seed, cfg.limit)
            if maker is not None:
                info.selection["edits_skipped"] = skipped_edits
            splits[plan.name] = info
    finally:
        bar.close()

    manifest = shards.Manifest(
        name=cfg.name,
        kind=cfg.kind,
        columns={f.name: str(f.type) for f in schema},
        image_format=cfg.image_format,
        image_mode=source.mode,
        image_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
        seed=cfg.seed,
        source=source.describe(),
        pipeline=cfg.model_dump(mode="json"),
        splits=splits,
        bad_records=bad.summary(),
    )
    shards.write_manifest(out, manifest, endpoint)
    seconds = time.perf_counter() - t0
    counts = ", ".join(f"{k}={v.count}" for k, v in splits.items())
    log.info(
        "built %s at %s: %s records (%s), %d bad, %.1fs",
        cfg.name,
        out,
        manifest.total,
        counts,
        bad.count,
        seconds,
    )
    return BuildResult(uri=out, manifest=manifest, bad=bad, seconds=seconds)
