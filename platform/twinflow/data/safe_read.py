"""Read shards for Ray Data one row group at a time, turning any read failure into bad records.

A shard garbled inside (footer intact) passed the up-front checks, then failed Ray Data's read task
with a raw "ZSTD decompression failed": the whole job errored, was restarted for nothing, and the
rows were never counted. Here a row group that cannot be read is counted (one record per id when the
`id` column still reads, else one record weighing the row group's rows, named `<shard>#row_group<i>`)
under the job's bad-record budget, and reading goes on.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twinflow.data.bad_records import BadRecord


def _lost(pf: pq.ParquetFile, shard: str, index: int, exc: Exception) -> list[BadRecord]:
    detail = f"shard {shard} row group {index}: {type(exc).__name__}: {exc}"[:200]
    try:
        ids = pf.read_row_group(index, columns=["id"]).column("id").to_pylist()
        if all(i is not None for i in ids):
            return [BadRecord("decode_error", str(i), detail) for i in ids]
    except Exception:
        pass
    return [
        BadRecord(
            "decode_error", f"{shard}#row_group{index}", detail, weight=pf.metadata.row_group(index).num_rows
        )
    ]


def iter_row_groups(
    fs, path: str, shard: str, count: int, columns: list[str]
) -> Iterator[pa.Table | list[BadRecord]]:
    """Tables of one shard's readable row groups, and lists of bad records for the others."""
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except Exception as exc:  # unreadable since the up-front check (replaced, cut): the whole shard
        yield [
            BadRecord("decode_error", shard, f"unreadable: {type(exc).__name__}: {exc}"[:200], weight=count)
        ]
        return
    for i in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(i, columns=columns)
        except Exception as exc:  # pyarrow raises OSError/ArrowInvalid/... for garbled pages
            yield _lost(pf, shard, i, exc)
            continue
        yield table


def read_stage(batch: dict[str, np.ndarray], fs: Any, columns: list[str], tracker) -> Iterator[pa.Table]:
    """Ray Data `map_batches` body over (path, shard, count) rows: yields row-group tables and reports
    what could not be read to `tracker` (which raises past the budget)."""
    for path, shard, count in zip(batch["path"], batch["shard"], batch["count"]):
        for part in iter_row_groups(fs, str(path), str(shard), int(count), columns):
            if isinstance(part, list):
                tracker.report(part)
            elif part.num_rows:
                yield part
