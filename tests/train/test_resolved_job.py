"""The driver resolves a job once (`train.resolved.resolve_job`): `data.path`'s manifest is read once
per job start, every input check runs on it, and the launcher and the data stream use what it found."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow import storage
from twinflow.data import shards
from twinflow.train import launcher
from twinflow.train.config import load_job
from twinflow.train.resolved import resolve_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def manifest_reads(monkeypatch):
    """Every read of a manifest.json, by URI. Every manifest reader (`shards.read_manifest`, and
    the raw JSON reads of periodic eval) ends in `storage.read_bytes`, so none is missed."""
    reads: list[str] = []
    real = storage.read_bytes

    def spy(uri, *args, **kwargs):
        if str(uri).endswith(shards.MANIFEST):
            reads.append(str(uri))
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", spy)
    return reads


def _job(data, tmp_path, *extra, base="fashion_base_fm.yaml"):
    return load_job(
        REPO / "jobs" / base,
        [f"data.path={data}", f"output.dir={tmp_path / 'runs'}", "cluster.num_workers=1", *extra],
    )


def _data_reads(reads: list[str], data: Path) -> list[str]:
    return [u for u in reads if u == storage.join(str(data), shards.MANIFEST)]


def test_resolving_and_preparing_a_job_reads_its_manifest_once(fashion_small, tmp_path, manifest_reads):
    job = _job(fashion_small, tmp_path)  # eval metrics on: the reference and prompt checks run too
    resolved = resolve_job(job, source="job.yaml")
    launcher.prepare_run(resolved.job)
    assert len(_data_reads(manifest_reads, fashion_small)) == 1, manifest_reads
    assert resolved.manifest is not None and resolved.manifest.digest() == (
        shards.read_manifest(str(fashion_small)).digest()
    )
    assert resolved.judge == "fashion_mnist"
    assert [f for f, _, _ in resolved.inputs] == ["data.path"]


def test_the_resolved_job_has_absolute_paths_and_its_batch_split(fashion_small, tmp_path, monkeypatch):
    monkeypatch.chdir(fashion_small.parent)
    job = _job(
        fashion_small.name,
        tmp_path,
        "train.micro_batch=8",
        "deepspeed.gradient_accumulation_steps=2",
        "train.init_from=null",
        base="fashion_twinflow.yaml",
    )
    resolved = resolve_job(job)
    assert job.data.path == fashion_small.name  # the caller's job is left as it was
    assert resolved.job.data.path == str(fashion_small)
    assert resolved.global_batch == 16
    assert resolved.group_split == job.method.split(16).as_dict()
    assert sum(resolved.group_split.values()) == 16
    assert "global batch 16 rows per step (" in launcher.batch_line(resolved)
    assert resolve_job(_job(fashion_small, tmp_path)).group_split is None  # flow matching: no groups


def test_data_that_does_not_fit_is_refused_before_anything_is_written(fashion_small, tmp_path):
    """An embedding cache made for another caption length: once refused only when the trainer was
    built (Ray running), now by `resolve_job`, before the run directory exists."""
    cache = tmp_path / "embedded"
    manifest = shards.read_manifest(str(fashion_small)).model_copy(
        update={
            "embedding": {"text_column": "caption", "max_length": 32, "dim": 384, "encoder_dir": "default"}
        }
    )
    cache.mkdir()
    shards.write_manifest(str(cache), manifest)
    job = _job(cache, tmp_path, "eval.metrics=false")
    with pytest.raises(
        ValueError, match=r"embedded: this embedding cache has max_length=32 but the config asks for 16"
    ):
        resolve_job(job)
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_one_driver_job_start_reads_the_manifest_once(ray_cluster, fashion_small, tmp_path, manifest_reads):
    """Everything the driver does before `fit()`: resolve, prepare the run, check the resume layout,
    build the trainer (null condition, Ray Data stream, worker config)."""
    resolved = resolve_job(_job(fashion_small, tmp_path))
    run_dir = launcher.prepare_run(resolved.job)
    launcher.check_resume_layout(resolved.job, run_dir)
    launcher.build_trainer(resolved, run_dir)
    assert len(_data_reads(manifest_reads, fashion_small)) == 1, manifest_reads
