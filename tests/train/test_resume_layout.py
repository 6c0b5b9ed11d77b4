"""A rerun with another worker count or ZeRO stage is refused before Ray starts, naming both layouts
(DeepSpeed failed deep in its load with "'NoneType' object has no attribute 'copy'", after retries)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.train.checkpointing import CheckpointError, check_layout, newest_layout
from twinflow.train.launcher import check_resume_layout
from twinflow.train.manifest import write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/reliability's job helpers
from reliability.helpers import make_job


def _checkpoint(run, name, world, stage=None, ranks=None):
    d = run / name
    d.mkdir(parents=True)
    (d / "ckpt").mkdir()
    (d / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for rank in ranks if ranks is not None else range(world):
        write_manifest(d, rank, world, 4, stage)
    return d


def test_the_newest_readable_manifest_decides(tmp_path):
    assert newest_layout(str(tmp_path)) is None
    _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    _checkpoint(tmp_path, "checkpoint_2026-11-30_10-05-00.000000", world=1, stage=0, ranks=[])  # cut off
    path, world, stage = newest_layout(str(tmp_path))
    assert path.endswith("10-00-00.000000") and (world, stage) == (2, 2)


def test_same_layout_resumes_other_layouts_are_refused(tmp_path):
    _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    check_layout(str(tmp_path), None, world=2, zero_stage=2)
    with pytest.raises(
        CheckpointError, match=r"written by 2 worker\(s\), ZeRO stage 2.*has 1 worker\(s\), ZeRO stage 0"
    ):
        check_layout(str(tmp_path), None, world=1, zero_stage=0)
    with pytest.raises(CheckpointError, match="ZeRO stage 3"):
        check_layout(str(tmp_path), None, world=2, zero_stage=3)


def test_a_manifest_without_a_stage_checks_the_world_only(tmp_path):
    _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2)
    check_layout(str(tmp_path), None, world=2, zero_stage=3)
    with pytest.raises(CheckpointError, match=r"written by 2 worker\(s\), and this run has 3"):
        check_layout(str(tmp_path), None, world=3, zero_stage=2)


def test_the_launcher_names_the_fields(tmp_path):
    job = make_job(tmp_path / "data", tmp_path / "runs", "relayout", "cluster.num_workers=1")
    run = tmp_path / "runs" / "relayout"
    _checkpoint(run, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    with pytest.raises(
        ConfigError, match=r"^cluster.num_workers / deepspeed.zero_stage: cannot resume .*--fresh"
    ):
        check_resume_layout(job, run)
    check_resume_layout(make_job(tmp_path / "data", tmp_path / "runs", "relayout"), run)  # 2 workers, ZeRO-2
