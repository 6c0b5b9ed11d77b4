"""Defect 8 (data): a shard garbled inside, footer intact, failed Ray Data's read with a raw "ZSTD
decompression failed" (after a wasted restart) and was never counted. Reading is now row group by
row group (twinflow.data.safe_read): what cannot be read is a counted bad record, per shard."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from twinflow.data import DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/data's helpers
from data.helpers import cache_embedding, cached_row, write_dataset

pytestmark = pytest.mark.integration


def garble_column(path: Path, column: str) -> None:
    """Overwrite the middle of one column chunk's pages with random bytes; the footer stays intact."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    names = [meta.column(j).path_in_schema for j in range(meta.num_columns)]
    chunk = meta.column(names.index(column))
    start = (chunk.dictionary_page_offset or chunk.data_page_offset) + 16
    size = chunk.total_compressed_size - 32
    raw = bytearray(path.read_bytes())
    raw[start : start + size] = os.urandom(size)
    path.write_bytes(bytes(raw))


def consume(ds, cfg) -> list[str]:
    from twinflow.data.streaming import iter_torch_kwargs

    return [i for b in ds.iter_torch_batches(batch_size=8, **iter_torch_kwargs(cfg)) for i in b["id"]]


def test_a_garbled_shard_is_counted_not_fatal(ray_cluster, tmp_path):
    from twinflow.data.streaming import bad_record_metrics, bad_record_report, build_train_dataset

    m = write_dataset(
        tmp_path, [cached_row(i) for i in range(40)], shard_size=10, embedding=cache_embedding()
    )
    victim = m.splits["train"].shards[1].path
    garble_column(tmp_path / victim, "image")
    assert pq.read_schema(tmp_path / victim)  # the footer still reads: the up-front check passes it
    cfg = DataConfig(path=str(tmp_path), image_size=8, channels=1, text_max_length=4, max_bad_fraction=0.3)
    ids = consume(build_train_dataset(cfg), cfg)
    lost = {f"r{i:03d}" for i in range(10, 20)}
    assert len(ids) == 30 and not lost & set(ids)
    report = bad_record_report(cfg)
    assert report["bad"] == 10 and set(report["by_reason"]["decode_error"]["ids"]) == lost
    assert all(victim in d for d in report["by_reason"]["decode_error"]["details"].values())
    # what a training run's rank 0 adds to each logged step (metrics.jsonl, TensorBoard)
    assert bad_record_metrics(cfg) == {"data/bad_records": 10.0, "data/bad_records/decode_error": 10.0}

    strict = cfg.model_copy(update={"max_bad_fraction": 0.2})  # allows 8 of 40
    with pytest.raises(Exception, match=r"too many bad records in train: 10 of 40"):
        consume(build_train_dataset(strict), strict)
