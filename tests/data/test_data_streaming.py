"""Ray Data streaming from local disk and from a local S3 server (moto), with and without the cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from twinflow import storage
from twinflow.data import BadDataError, DataConfig, MissingPathError, build_pipeline, load_pipeline
from twinflow.data.shards import read_manifest, verify_checksums

from .helpers import cache_embedding, cached_edit_row, cached_row, write_dataset

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"

pytestmark = pytest.mark.integration


def consume(ds, cfg: DataConfig, batch_size: int = 32) -> dict[str, list]:
    """Drain a dataset the way the training loop does; returns all rows column-wise."""
    from twinflow.data.streaming import iter_torch_kwargs

    out: dict[str, list] = {}
    for batch in ds.iter_torch_batches(batch_size=batch_size, **iter_torch_kwargs(cfg)):
        for key, value in batch.items():
            out.setdefault(key, []).extend(list(value))
    return out


@pytest.fixture(scope="module")
def encoder():
    from twinflow.models.text_encoder import TextEncoder

    return TextEncoder(max_length=16, cache_size=0)


def test_embed_cache_is_built_once_and_matches_the_encoder(ray_cluster, fashion_small, encoder):
    from twinflow.data.embed_cache import cache_uri
    from twinflow.data.local import iter_local_records
    from twinflow.data.streaming import build_train_dataset

    cfg = DataConfig(
        path=str(fashion_small),
        split="eval",
        image_size=28,
        channels=1,
        text_max_length=16,
        embed_cache=True,
        embed_batch_size=16,
    )
    rows = consume(build_train_dataset(cfg), cfg)
    assert len(rows["id"]) == 32
    assert sorted(rows["id"]) == sorted(r["id"] for r in iter_local_records(str(fashion_small), "eval"))
    cache = read_manifest(cache_uri(cfg))
    assert cache.embedding["dim"] == 384 and cache.embedding["max_length"] == 16
    assert cache.embedding["source_digest"] == read_manifest(str(fashion_small)).digest()
    assert verify_checksums(cache_uri(cfg), cache) == {}
    ref = encoder.encode(rows["caption"])
    torch.testing.assert_close(torch.stack(rows["text_states"]), ref["text_states"], atol=2e-2, rtol=1e-2)
    assert torch.equal(torch.stack(rows["text_mask"]), ref["text_mask"])
    # A second job finds the cache current and streams it without rebuilding.
    build_train_dataset(cfg)
    assert read_manifest(cache_uri(cfg)).created_at == cache.created_at
    assert storage.list_files(cache_uri(cfg)) == ["eval/part-00000.parquet", "manifest.json"]
    # The in-process reader uses the same cache once it exists.
    from twinflow.data.local import iter_local_batches

    local = next(iter_local_batches(cfg, batch_size=32))
    order = [rows["id"].index(i) for i in local["id"]]
    torch.testing.assert_close(
        torch.from_numpy(local["text_states"]), torch.stack(rows["text_states"])[order]
    )


def broken_cache(root, n=40):
    """An embedding-cache folder (so no encoder is needed) with four broken records."""
    rows = [cached_row(i) for i in range(n)]
    rows[2]["image"] = b"not a png"
    rows[11]["caption"] = ""
    rows[23]["text_states"] = b"\x00" * 5  # 5 bytes do not split into 3 float32 tokens
    rows[31]["image"] = None
    return write_dataset(root, rows, shard_size=10, embedding=cache_embedding())


def test_corrupt_records_are_skipped_and_counted_by_ray(ray_cluster, tmp_path):
    from twinflow.data.streaming import bad_record_report, build_train_dataset

    broken_cache(tmp_path)
    cfg = DataConfig(path=str(tmp_path), image_size=8, channels=1, text_max_length=4, max_bad_fraction=0.1)
    rows = consume(build_train_dataset(cfg), cfg, batch_size=8)
    assert len(rows["id"]) == 36 and not {"r002", "r011", "r023", "r031"} & set(rows["id"])
    report = bad_record_report(cfg, write_to=str(tmp_path / "report" / "bad_records.json"))
    assert report["bad"] == 4 and report["expected"] == 40
    assert json.loads((tmp_path / "report" / "bad_records.json").read_text()) == report
    by = report["by_reason"]
    assert sorted(by["decode_error"]["ids"]) == ["r002", "r023"]
    assert by["empty_caption"]["ids"] == ["r011"] and by["missing_column"]["ids"] == ["r031"]

    strict = cfg.model_copy(update={"max_bad_fraction": 0.05})  # allows 2 of 40
    # Tasks report a whole batch at once, so the job stops at the first report past the budget.
    # Ray Data wraps the stage's exception; our message comes through in the consumer's error.
    with pytest.raises(
        Exception, match=r"BadDataError: too many bad records in train: [34] of 40 .*allows 2"
    ):
        consume(build_train_dataset(strict), strict, batch_size=8)


def test_missing_shards_count_up_front(ray_cluster, tmp_path):
    from twinflow.data.streaming import bad_record_report, build_train_dataset

    m = broken_cache(tmp_path)
    (tmp_path / m.splits["train"].shards[3].path).unlink()
    cfg = DataConfig(path=str(tmp_path), image_size=8, channels=1, text_max_length=4, max_bad_fraction=0.3)
    build_train_dataset(cfg)  # nothing read yet; the missing shard is already counted
    assert bad_record_report(cfg)["by_reason"]["missing_shard"] == {
        "count": 10,
        "ids": ["train/part-00003.parquet"],
        "details": {"train/part-00003.parquet": "10 records"},
    }
    with pytest.raises(BadDataError, match="missing_shard=10"):
        build_train_dataset(cfg.model_copy(update={"max_bad_fraction": 0.25 - 1e-9}))  # allows 9


def test_per_worker_shards_split_the_rows(ray_cluster, tmp_path):
    """`get_dataset_shard` hands each worker one `streaming_split` iterator: disjoint, together complete."""
    from twinflow.data.streaming import build_train_dataset, iter_torch_kwargs

    write_dataset(tmp_path, [cached_row(i) for i in range(64)], shard_size=8, embedding=cache_embedding())
    cfg = DataConfig(path=str(tmp_path), image_size=8, channels=1, text_max_length=4, shuffle_buffer=16)
    splits = build_train_dataset(cfg).streaming_split(2, equal=True)
    seen: list[list[str]] = [[], []]

    def worker(rank: int) -> None:
        for batch in splits[rank].iter_torch_batches(batch_size=8, **iter_torch_kwargs(cfg)):
            assert batch["image"].shape[1:] == (1, 8, 8) and batch["text_states"].shape[1:] == (4, 6)
            seen[rank].extend(batch["id"])

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 64


def test_edit_pairs_stream_source_and_target(ray_cluster, tmp_path):
    from twinflow.data.streaming import build_train_dataset

    write_dataset(
        tmp_path,
        [cached_edit_row(i) for i in range(12)],
        shard_size=6,
        kind="edit_pairs",
        embedding=cache_embedding(text_column="instruction"),
    )
    cfg = DataConfig(
        path=str(tmp_path), image_size=8, channels=1, text_max_length=4, text_column="instruction"
    )
    rows = consume(build_train_dataset(cfg), cfg, batch_size=4)
    assert len(rows["id"]) == 12 and set(rows["instruction"]) == {"invert the image"}
    src, tgt = torch.stack(rows["source_image"]), torch.stack(rows["image"])
    assert src.shape == tgt.shape == (12, 1, 8, 8)
    torch.testing.assert_close(src + tgt, torch.zeros_like(src), atol=1e-6, rtol=0)  # inverted in [-1, 1]
    with pytest.raises(ValueError, match="text_column='instruction' but the config asks for 'caption'"):
        build_train_dataset(cfg.model_copy(update={"text_column": "caption"}))


def test_s3_round_trip_build_inspect_and_stream(ray_cluster, s3_server, bucket, fashion_small, encoder):
    from twinflow.data.local import iter_local_records
    from twinflow.data.streaming import bad_record_report, build_train_dataset

    uri = f"s3://{bucket}/fashion"
    cfg = load_pipeline(
        PIPELINES / "fashion_mnist.yaml",
        [f"output={uri}", "shard_size=32", "splits.train.count=96", "splits.eval.count=32"],
    )
    build_pipeline(cfg, progress=False)
    m = read_manifest(uri)
    local = read_manifest(str(fashion_small))
    assert [s.sha256 for s in m.splits["train"].shards] == [s.sha256 for s in local.splits["train"].shards]
    assert verify_checksums(uri, m) == {}
    assert len(list(iter_local_records(DataConfig(path=uri, split="eval", image_size=28, channels=1)))) == 32

    # The full path a job takes: S3 shards -> decode -> text-encoder actor pool -> torch batches.
    data = DataConfig(
        path=uri,
        split="train",
        image_size=32,
        channels=1,
        text_max_length=16,
        embed_batch_size=48,
        decode_batch_size=32,
        s3_endpoint=s3_server,
    )
    rows = consume(build_train_dataset(data), data)
    assert sorted(rows["id"]) == sorted(r["id"] for r in iter_local_records(str(fashion_small), "train"))
    img = torch.stack(rows["image"])
    assert img.shape == (96, 1, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.3
    states, mask = torch.stack(rows["text_states"]), torch.stack(rows["text_mask"])
    assert states.shape == (96, 16, 384) and mask.dtype == torch.int64
    ref = encoder.encode(rows["caption"][:5])
    torch.testing.assert_close(states[:5], ref["text_states"], atol=1e-4, rtol=0)
    assert torch.equal(mask[:5], ref["text_mask"])
    assert bad_record_report(data)["bad"] == 0


def test_s3_missing_bucket_or_prefix_is_one_clear_error(ray_cluster, s3_server, bucket):
    from twinflow.data.streaming import build_train_dataset

    with pytest.raises(MissingPathError, match=r"bucket 'no-such-bucket' does not exist .*127\.0\.0\.1"):
        build_train_dataset(DataConfig(path="s3://no-such-bucket/shards"))
    with pytest.raises(MissingPathError, match=f"dataset folder not found: s3://{bucket}/nothing-here"):
        build_train_dataset(DataConfig(path=f"s3://{bucket}/nothing-here"))
    cfg = load_pipeline(PIPELINES / "emoji.yaml", ["output=s3://no-such-bucket/emoji", "limit=2"])
    with pytest.raises(MissingPathError, match="bucket 'no-such-bucket' does not exist"):
        build_pipeline(cfg, progress=False)


def test_s3_upload_and_download_dir(s3_server, bucket, fashion_small, tmp_path):
    uri = f"s3://{bucket}/copy"
    files = storage.list_files(fashion_small)
    assert "manifest.json" in files and "train/part-00002.parquet" in files
    assert storage.upload_dir(fashion_small, uri) == len(files)
    assert storage.list_files(uri) == files and storage.exists(f"{uri}/manifest.json")
    assert storage.download_dir(uri, tmp_path / "back") == len(files)
    assert verify_checksums(str(tmp_path / "back"), read_manifest(str(tmp_path / "back"))) == {}
    storage.delete_dir(uri)
    assert not storage.exists(uri)
