"""The shard format: parquet files of records plus one `manifest.json` (see docs/data.md).

Layout under a dataset root (local folder or s3 prefix)::

    manifest.json              written last: a build without one is incomplete
    <split>/part-00000.parquet one folder per split, `shard_size` records per file

Shards are encoded in memory, hashed, then written, so the manifest's sha256 is of the exact bytes
stored and the same code writes to a local disk and to S3.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from twinflow import storage

FORMAT = "twinflow-shards"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("caption", pa.string()),
    pa.field("label", pa.int32()),
]
EDIT_FIELDS = [
    pa.field("source_image", pa.binary()),
    pa.field("instruction", pa.string()),
    pa.field("edit", pa.string()),
]
EMBED_FIELDS = [
    pa.field("text_states", pa.binary()),
    pa.field("text_len", pa.int32()),
]
REQUIRED = {
    "image_text": ("id", "image", "caption"),
    "edit_pairs": ("id", "image", "caption", "source_image", "instruction"),
}


def schema_for(kind: str, embedded: bool = False) -> pa.Schema:
    if kind not in REQUIRED:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(REQUIRED)}")
    fields = list(BASE_FIELDS) + (EDIT_FIELDS if kind == "edit_pairs" else [])
    return pa.schema(fields + (EMBED_FIELDS if embedded else []))


class ShardInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="relative to the dataset root")
    count: int
    sha256: str
    bytes: int


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = 0
    shards: list[ShardInfo] = Field(default_factory=list)
    selection: dict[str, Any] = Field(
        default_factory=dict, description="how the split was cut from the source"
    )


class Manifest(BaseModel):
    """What a reader needs before touching a shard: schema, counts, checksums, provenance."""

    model_config = ConfigDict(extra="forbid")
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    name: str
    kind: str
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    columns: dict[str, str]
    image_format: str
    image_mode: str
    image_size: list[int] | None = Field(None, description="[width, height] when every image has it")
    seed: int = 0
    source: dict[str, Any] = Field(default_factory=dict)
    pipeline: dict[str, Any] = Field(default_factory=dict)
    splits: dict[str, SplitInfo] = Field(default_factory=dict)
    bad_records: dict[str, Any] = Field(default_factory=dict)
    embedding: dict[str, Any] | None = Field(None, description="set on embedding caches")

    @property
    def total(self) -> int:
        return sum(s.count for s in self.splits.values())

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise KeyError(f"split {name!r} not in dataset {self.name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def digest(self) -> str:
        """A hash of the shard checksums: identifies this exact data (used to key embedding caches)."""
        h = hashlib.sha256()
        for name in sorted(self.splits):
            for shard in self.splits[name].shards:
                h.update(f"{name}/{shard.path}:{shard.sha256}\n".encode())
        return h.hexdigest()


def read_manifest(root: str, endpoint: str | None = None) -> Manifest:
    """Load and check ``<root>/manifest.json``; a missing root or manifest is one clear error."""
    storage.require(root, endpoint, what="dataset folder")
    uri = storage.join(root, MANIFEST)
    if not storage.exists(uri, endpoint):
        raise storage.MissingPathError(
            f"{uri}: no manifest.json (not a twinflow shard folder, or an interrupted build; "
            "rebuild with `twinflow data build pipelines/<name>.yaml`)"
        )
    try:
        data = json.loads(storage.read_bytes(uri, endpoint))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: manifest is not valid JSON: {exc}") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{uri}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(
            f"{uri}: schema_version {data['schema_version']} is newer than this reader "
            f"({SCHEMA_VERSION}); upgrade twinflow"
        )
    return Manifest.model_validate(data)


def write_manifest(root: str, manifest: Manifest, endpoint: str | None = None) -> None:
    storage.write_bytes(storage.join(root, MANIFEST), manifest.model_dump_json(indent=2).encode(), endpoint)


def encode_table(table: pa.Table, row_group_size: int = 1024) -> bytes:
    buf = io.BytesIO()
    # Binary columns keep dictionary encoding: repeated captions and cached text states of repeated
    # captions are stored once per row group.
    pq.write_table(
        table, buf, compression="zstd", row_group_size=row_group_size, dictionary_pagesize_limit=4 << 20
    )
    return buf.getvalue()


class ShardWriter:
    """Buffers rows of one split and writes `<root>/<split>/part-NNNNN.parquet` every `shard_size` rows."""

    def __init__(
        self, root: str, split: str, schema: pa.Schema, shard_size: int, endpoint: str | None = None
    ) -> None:
        self.root, self.split, self.schema = root, split, schema
        self.shard_size, self.endpoint = shard_size, endpoint
        self.rows: list[dict[str, Any]] = []  # pending rows, after the pending tables
        self.tables: list[pa.Table] = []
        self.pending = 0
        self.shards: list[ShardInfo] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.pending += 1
        if self.pending >= self.shard_size:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        """Append a table (e.g. a Ray Data batch); columns are cast to the schema, absent optional ones null."""
        self._rows_to_table()
        self.tables.append(conform(table, self.schema))
        self.pending += table.num_rows
        while self.pending >= self.shard_size:
            self.flush()

    def _rows_to_table(self) -> None:
        if self.rows:
            self.tables.append(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def flush(self) -> None:
        self._rows_to_table()
        if not self.pending:
            return
        table = pa.concat_tables(self.tables) if len(self.tables) > 1 else self.tables[0]
        head, rest = table.slice(0, self.shard_size), table.slice(self.shard_size)
        self.tables = [rest] if rest.num_rows else []
        self.pending = rest.num_rows
        data = encode_table(head)
        rel = posixpath.join(self.split, f"part-{len(self.shards):05d}.parquet")
        storage.write_bytes(storage.join(self.root, rel), data, self.endpoint)
        self.shards.append(
            ShardInfo(path=rel, count=head.num_rows, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        )

    def close(self) -> SplitInfo:
        while self.pending or self.rows:
            self.flush()
        return SplitInfo(count=sum(s.count for s in self.shards), shards=list(self.shards))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: cast where present, nulls where an optional one is absent."""
    columns = []
    for f in schema:
        if f.name in table.column_names:
            columns.append(table.column(f.name).cast(f.type))
        elif f.nullable:
            columns.append(pa.nulls(table.num_rows, f.type))
        else:
            raise ValueError(f"table lacks required column {f.name!r}")
    return pa.Table.from_arrays(columns, schema=schema)


def remove_previous(root: str, endpoint: str | None = None) -> int:
    """Delete the manifest and the shards listed by an earlier build at ``root`` (nothing else)."""
    try:
        old = read_manifest(root, endpoint)
    except (storage.MissingPathError, ValueError):
        return 0
    fs, base = storage.open_filesystem(root, endpoint)
    fs.delete_file(posixpath.join(base, MANIFEST))
    removed = 0
    for split in old.splits.values():
        for shard in split.shards:
            try:
                fs.delete_file(posixpath.join(base, shard.path))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def verify_checksums(root: str, manifest: Manifest, endpoint: str | None = None) -> dict[str, str]:
    """Recompute every shard's sha256; returns {relative path: problem} for the ones that differ."""
    problems: dict[str, str] = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            uri = storage.join(root, shard.path)
            try:
                digest = hashlib.sha256(storage.read_bytes(uri, endpoint)).hexdigest()
            except storage.MissingPathError:
                problems[shard.path] = "missing"
                continue
            if digest != shard.sha256:
                problems[shard.path] = f"sha256 {digest[:12]}... != manifest {shard.sha256[:12]}..."
    return problems


def iter_shard_tables(
    root: str, shards: list[ShardInfo], endpoint: str | None = None, columns: list[str] | None = None
) -> Iterator[tuple[ShardInfo, pa.Table]]:
    """Read shards one by one with pyarrow (no Ray); missing files raise MissingPathError."""
    fs, base = storage.open_filesystem(root, endpoint)
    for shard in shards:
        path = posixpath.join(base, shard.path)
        try:
            table = pq.read_table(path, filesystem=fs, columns=columns)
        except FileNotFoundError:
            raise storage.MissingPathError(f"shard not found: {storage.join(root, shard.path)}") from None
        yield shard, table
