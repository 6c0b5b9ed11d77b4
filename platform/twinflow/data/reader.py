"""Open one split of a shard folder without Ray: manifest, then each shard checked up front.

A missing shard, an unreadable one or one without a required column is turned into bad records here
(with the shard's ids when they can be read), so readers start with an exact count of what is lost.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from twinflow import storage
from twinflow.data import shards
from twinflow.data.bad_records import BadRecord


@dataclass
class SplitShards:
    """One split of a shard folder, checked up front: which shards exist and have every column."""

    root: str
    endpoint: str | None
    manifest: shards.Manifest
    split: str
    fs: pafs.FileSystem
    base: str
    usable: list[shards.ShardInfo] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)  # present in every usable shard

    @property
    def expected(self) -> int:
        return self.manifest.split(self.split).count

    @property
    def paths(self) -> list[str]:
        return [posixpath.join(self.base, s.path) for s in self.usable]


def open_split(
    root: str,
    split: str,
    endpoint: str | None = None,
    verify: bool = True,
    columns: tuple[str, ...] | None = None,
    manifest: shards.Manifest | None = None,
) -> SplitShards:
    """Read the manifest (unless the caller passes the one it read) and check the split's shards
    (existence, and columns when ``verify``)."""
    manifest = manifest or shards.read_manifest(root, endpoint)
    try:
        info = manifest.split(split)
    except KeyError as exc:
        raise ValueError(f"{root}: {exc.args[0]}") from None
    fs, base = storage.open_filesystem(root, endpoint)
    need = columns or (
        shards.REQUIRED[manifest.kind] + (("text_states", "text_len") if manifest.embedding else ())
    )
    out = SplitShards(root, endpoint, manifest, split, fs, base)
    for shard in info.shards:
        path = posixpath.join(base, shard.path)
        if not verify:
            out.usable.append(shard)
            out.columns = set(manifest.columns)
            continue
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            out.bad.append(
                BadRecord("missing_shard", shard.path, f"{shard.count} records", weight=shard.count)
            )
            continue
        try:
            schema = pq.read_schema(fs.open_input_file(path))
        except Exception as exc:  # a truncated or non-parquet file
            out.bad.append(
                BadRecord("missing_shard", shard.path, f"unreadable: {exc}"[:200], weight=shard.count)
            )
            continue
        lacking = [c for c in need if c not in schema.names]
        if lacking:
            out.bad.extend(_whole_shard_missing(fs, path, shard, lacking, "id" in schema.names))
            continue
        out.usable.append(shard)
        out.columns = set(schema.names) if len(out.usable) == 1 else out.columns & set(schema.names)
    return out


def _whole_shard_missing(
    fs: pafs.FileSystem, path: str, shard: shards.ShardInfo, lacking: list[str], has_ids: bool
) -> list[BadRecord]:
    detail = f"shard {shard.path} lacks column(s) {', '.join(lacking)}"
    if has_ids:
        ids = pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_pylist()
        return [BadRecord("missing_column", str(i), detail) for i in ids]
    return [BadRecord("missing_column", shard.path, detail, weight=shard.count)]
