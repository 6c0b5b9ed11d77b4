"""The in-process reader, bad-record accounting, storage helpers and the CLI (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twinflow import storage
from twinflow.data import BadDataError, BadRecord, BadRecordLog, DataConfig, MissingPathError
from twinflow.data.cli import main_data
from twinflow.data.local import iter_local_batches, iter_local_records

from .helpers import cache_embedding, cached_row, good_row, png, write_dataset


def broken_dataset(root, n_good=16):
    rows = [good_row(i) for i in range(n_good)]
    rows[3]["image"] = b"\x89PNG\r\n\x1a\nthis is not an image"
    rows[5]["caption"] = "   "
    rows[7]["caption"] = None
    rows[9]["image"] = None
    return write_dataset(root, rows, shard_size=4)


def test_local_records_have_the_training_layout(fashion_small):
    cfg = DataConfig(path=str(fashion_small), split="eval", image_size=32, channels=1)
    recs = list(iter_local_records(cfg))
    assert len(recs) == 32
    r = recs[0]
    assert r["image"].shape == (1, 32, 32) and r["image"].dtype == np.float32
    assert -1.0 <= r["image"].min() < r["image"].max() <= 1.0
    assert isinstance(r["caption"], str) and r["id"].startswith("fmnist-test-") and 0 <= r["label"] <= 9
    rgb = next(iter_local_records(cfg.model_copy(update={"channels": 3, "image_size": 20})))
    assert rgb["image"].shape == (3, 20, 20)
    assert np.allclose(rgb["image"][0], rgb["image"][1]), "gray replicated to RGB"


def test_native_size_when_given_a_path(fashion_small):
    batch = next(iter_local_batches(str(fashion_small), "train", batch_size=8))
    assert batch["image"].shape == (8, 1, 28, 28)
    # The stored bytes decode back to the original Fashion-MNIST pixels.
    from twinflow.data.config import FashionMnistSource
    from twinflow.data.sources.fashion_mnist import FashionMnist

    src = FashionMnist(FashionMnistSource(type="fashion_mnist"), 0)
    index = int(batch["id"][0].rsplit("-", 1)[1])
    original = np.asarray(src.item("train", index).image, np.float32) / 127.5 - 1
    assert np.array_equal(batch["image"][0, 0], original)


def test_bad_records_are_skipped_and_counted_with_ids(tmp_path):
    broken_dataset(tmp_path)
    bad = BadRecordLog(expected=16, max_bad_fraction=0.5)
    recs = list(iter_local_records(DataConfig(path=str(tmp_path), image_size=8, channels=1), bad=bad))
    assert len(recs) == 12
    assert bad.counts() == {"decode_error": 1, "empty_caption": 1, "missing_column": 2}
    summary = bad.summary()
    assert summary["by_reason"]["decode_error"]["ids"] == ["r003"]
    assert summary["by_reason"]["empty_caption"]["ids"] == ["r005"]
    assert sorted(summary["by_reason"]["missing_column"]["ids"]) == ["r007", "r009"]
    assert "null image" in summary["by_reason"]["missing_column"]["details"]["r009"]
    assert {r["id"] for r in recs}.isdisjoint({"r003", "r005", "r007", "r009"})


def test_too_many_bad_records_stop_with_a_clear_error(tmp_path):
    broken_dataset(tmp_path)
    cfg = DataConfig(path=str(tmp_path), image_size=8, channels=1, max_bad_fraction=0.2)  # allows 3 of 16
    with pytest.raises(
        BadDataError, match=r"too many bad records in train: 4 of 16 .*allows 3.*raise max_bad_fraction"
    ):
        list(iter_local_records(cfg))


def test_missing_shard_and_missing_column_are_counted(tmp_path):
    import pyarrow.parquet as pq

    m = write_dataset(tmp_path, [good_row(i) for i in range(12)], shard_size=4)
    (tmp_path / m.splits["train"].shards[0].path).unlink()
    shard = tmp_path / m.splits["train"].shards[1].path
    pq.write_table(pq.read_table(shard).drop_columns(["caption"]), shard)
    bad = BadRecordLog(expected=12, max_bad_fraction=1.0)
    recs = list(iter_local_records(DataConfig(path=str(tmp_path), image_size=8, channels=1), bad=bad))
    assert [r["id"] for r in recs] == ["r008", "r009", "r010", "r011"]
    assert bad.counts() == {"missing_shard": 4, "missing_column": 4}
    assert bad.summary()["by_reason"]["missing_shard"]["ids"] == ["train/part-00000.parquet"]
    assert sorted(bad.summary()["by_reason"]["missing_column"]["ids"]) == ["r004", "r005", "r006", "r007"]


def test_bad_record_log_dedupes_ids_and_budget_is_absolute():
    log = BadRecordLog(expected=1000, max_bad_fraction=0.003)
    assert log.budget == 3
    assert log.add(BadRecord("decode_error", "a")) and not log.add(BadRecord("decode_error", "a"))
    log.add(BadRecord("missing_shard", "s/part-1", weight=2))
    assert log.count == 3
    with pytest.raises(BadDataError, match="4 of 1000"):
        log.add(BadRecord("empty_caption", "b"))
    with pytest.raises(ValueError, match="unknown bad-record reason"):
        BadRecord("gremlins", "x")


def test_ray_counter_body_dedupes_and_reports_past_budget():
    from twinflow.data.tracking import BadRecordCounter

    counter = BadRecordCounter(expected=100, max_bad_fraction=0.02, what="records")
    assert counter.add([BadRecord("decode_error", "a"), BadRecord("decode_error", "b")]) == (False, "")
    assert counter.add([BadRecord("decode_error", "a")]) == (False, ""), "a second epoch counts nothing new"
    over, message = counter.add([BadRecord("empty_caption", "c")])
    assert over and "3 of 100 expected (max_bad_fraction=0.02 allows 2)" in message
    assert counter.summary()["by_reason"]["decode_error"]["ids"] == ["a", "b"]
    assert [r["id"] for r in counter.records()] == ["a", "b", "c"]


def test_cached_states_are_unpadded_exactly(tmp_path):
    write_dataset(tmp_path, [cached_row(i) for i in range(5)], shard_size=5, embedding=cache_embedding())
    batch = next(
        iter_local_batches(DataConfig(path=str(tmp_path), image_size=8, channels=1, text_max_length=4))
    )
    assert batch["text_states"].shape == (5, 4, 6) and batch["text_mask"].tolist()[0] == [1, 1, 1, 0]
    assert batch["text_states"][2, 1, 3] == pytest.approx(2 + 0.1 + 0.03)
    assert (batch["text_states"][:, 3] == 0).all()


def test_edit_pairs_decode_with_instruction_text(tmp_path):
    from twinflow.data import build_pipeline, load_pipeline

    PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"

    build_pipeline(
        load_pipeline(PIPELINES / "emoji_edits.yaml", [f"output={tmp_path}", "limit=4"]), progress=False
    )
    cfg = DataConfig(path=str(tmp_path), image_size=32, channels=3, text_column="instruction")
    batch = next(iter_local_batches(cfg, batch_size=12))
    assert batch["image"].shape == batch["source_image"].shape == (12, 3, 32, 32)
    assert all(isinstance(t, str) and t for t in batch["instruction"])
    assert not np.array_equal(batch["image"], batch["source_image"])


def test_instruction_text_needs_edit_pairs(fashion_small):
    from twinflow.data.streaming import build_train_dataset

    # Checked before anything touches Ray.
    with pytest.raises(ValueError, match="text_column=instruction needs an edit-pairs dataset"):
        build_train_dataset(DataConfig(path=str(fashion_small), text_column="instruction"))


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(MissingPathError, match=f"dataset folder not found: {tmp_path / 'nope'}"):
        list(iter_local_records(DataConfig(path=str(tmp_path / "nope"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match="no manifest.json"):
        list(iter_local_records(DataConfig(path=str(tmp_path / "empty"))))


def test_unknown_split_names_the_ones_that_exist(fashion_small):
    with pytest.raises(
        ValueError, match=r"split 'test' not in dataset 'fashion_mnist'; it has \['eval', 'train'\]"
    ):
        list(iter_local_records(DataConfig(path=str(fashion_small), split="test")))


def test_storage_paths_and_errors(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    fs, path = storage.open_filesystem(tmp_path / "x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    assert storage.join("s3://bkt/a", "b", "c.json") == "s3://bkt/a/b/c.json"
    assert storage.join(str(tmp_path), "b") == str(tmp_path / "b")
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.open_filesystem("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.open_filesystem("s3:///x")
    monkeypatch.setenv("TWINFLOW_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:1")
    assert storage.resolve_endpoint() == "http://127.0.0.1:9"
    assert storage.resolve_endpoint("http://explicit:2") == "http://explicit:2"
    storage.write_bytes(tmp_path / "d" / "f.bin", b"abc")
    assert storage.read_bytes(tmp_path / "d" / "f.bin") == b"abc"
    assert storage.upload_dir(tmp_path / "d", str(tmp_path / "e")) == 1
    assert storage.list_files(tmp_path / "e") == ["f.bin"]


def test_cli_build_and_inspect(tmp_path, capsys):
    assert (
        main_data(
            [
                "build",
                "pipelines/mnist_digits.yaml",
                "--output",
                str(tmp_path),
                "--limit",
                "7",
                "--no-progress",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 7 records in 1 shards" in out and "eval: 7 records" in out
    assert main_data(["inspect", str(tmp_path), "--verify", "--samples", "2", "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "checksums: all ok" in out and out.count("a handwritten digit") == 2
    assert main_data(["inspect", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["count"] == 7
    assert main_data(["inspect", str(tmp_path / "missing")]) == 1
    assert "dataset folder not found" in capsys.readouterr().err
    assert main_data(["build", "pipelines/mnist_digits.yaml", "--set", "seed=x"]) == 2


def test_cli_is_mounted_under_twinflow_data(tmp_path):
    import argparse

    from twinflow.data.cli import add_data_commands

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["data", "build", "pipelines/emoji.yaml", "--set", "limit=3", "--output", str(tmp_path)]
    )
    assert args.set == ["limit=3"] and callable(args.func)
    assert (
        parser.parse_args(["data", "inspect", "s3://b/p", "--endpoint", "http://h:1"]).endpoint
        == "http://h:1"
    )


def test_png_helper_round_trip():
    from twinflow.data.images import load_chw

    arr = load_chw(png(255, 4), 4, 1)
    assert arr.shape == (1, 4, 4) and (arr == 1.0).all()
