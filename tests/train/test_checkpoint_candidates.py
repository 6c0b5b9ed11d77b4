"""Which checkpoints a restore tries, and which layout a rerun reads, from the run's storage listing:
Ray's latest once, then the others newest first; a one-worker run's layout from its rank-0 manifest;
the S3 endpoint carried to every listing (a dropped endpoint lists AWS instead of the job's server)."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import ray.train

import twinflow.storage
from twinflow.train.checkpointing import candidates, checkpoint_dirs, newest_layout
from twinflow.train.manifest import write_manifest

OLD, NEW = "checkpoint_2026-11-30_10-00-00.000000", "checkpoint_2026-11-30_10-05-00.000000"


def _checkpoint(run: Path, name: str, world: int, stage: int | None) -> Path:
    d = run / name
    (d / "ckpt").mkdir(parents=True)
    (d / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for rank in range(world):
        write_manifest(d, rank, world, 4, stage)
    return d


def test_rays_latest_comes_first_and_is_not_listed_again(tmp_path):
    old, new = _checkpoint(tmp_path, OLD, 2, 2), _checkpoint(tmp_path, NEW, 2, 2)
    tried = [c.path for c in candidates(ray.train.Checkpoint(path=str(old)), str(tmp_path))]
    assert tried == [str(old), str(new)]
    assert [c.path for c in candidates(None, str(tmp_path))] == [str(new), str(old)]
    assert [c.path for c in candidates(ray.train.Checkpoint(path=str(old)), None)] == [str(old)]
    assert candidates(None, None) == []


def test_only_checkpoint_folders_are_listed(tmp_path):
    d = _checkpoint(tmp_path, OLD, 1, 0)
    (tmp_path / "logs").mkdir()  # the run's other folders and files
    (tmp_path / "checkpoint_notes.txt").write_text("a file, not a checkpoint")
    assert checkpoint_dirs(str(tmp_path))[1] == [str(d)]


def test_a_one_worker_checkpoint_has_its_layout_read(tmp_path):
    d = _checkpoint(tmp_path, OLD, 1, 0)  # rank 0's manifest only
    assert newest_layout(str(tmp_path)) == (str(d), 1, 0)


def test_the_s3_endpoint_reaches_every_listing(tmp_path, monkeypatch):
    _checkpoint(tmp_path, OLD, 2, 3)
    seen, fs = [], pafs.LocalFileSystem()

    def local_filesystem(uri, endpoint=None):
        seen.append(endpoint)
        return fs, str(uri)

    monkeypatch.setattr(twinflow.storage, "open_filesystem", local_filesystem)
    endpoint = "http://127.0.0.1:9000"
    assert len(checkpoint_dirs(str(tmp_path), endpoint)[1]) == 1
    listed = candidates(None, str(tmp_path), endpoint)
    assert len(listed) == 1 and listed[0].filesystem is fs  # read through the filesystem that listed it
    assert newest_layout(str(tmp_path), endpoint)[1:] == (2, 3)
    assert seen == [endpoint] * 3
