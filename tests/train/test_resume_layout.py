"""A rerun on another worker count or ZeRO stage converts the run's newest checkpoint to DeepSpeed's
universal format before Ray starts (train/relayout.py); what cannot be converted is one line naming
the fields. The conversion itself, and the resumed training, are tested on real DeepSpeed runs in
test_relayout_deepspeed.py."""

from __future__ import annotations

import pytest

from twinflow.config import ConfigError
from twinflow.train.checkpointing import describe, layout_of, newest_layout, same_layout
from twinflow.train.launcher import check_resume_layout
from twinflow.train.manifest import write_manifest
from twinflow.train.relayout import UNIVERSAL_DIR, RelayoutError, prepare, verify


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


def test_layouts_compare_world_and_stage(tmp_path):
    d = _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    assert layout_of(d) == (2, 2) and layout_of(tmp_path) is None
    assert same_layout((2, 2), (2, 2)) and not same_layout((2, 2), (1, 0)) and not same_layout((2, 2), (2, 3))
    assert same_layout((2, None), (2, 3))  # a manifest without a stage: the world decides
    assert describe((2, 3)) == "2 worker(s) at ZeRO stage 3"


def test_the_same_layout_needs_no_conversion(tmp_path):
    d = _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    assert prepare(newest_layout(str(tmp_path)), str(tmp_path), None, 2, 2, "ckpt") is None
    assert not (d / UNIVERSAL_DIR).exists() and verify(d) == ["no manifest.universal.json (never converted)"]


def test_a_checkpoint_that_does_not_convert_is_one_line_naming_the_fields(tmp_path):
    from tests.reliability.helpers import make_job

    job = make_job(tmp_path / "data", tmp_path / "runs", "relayout", "cluster.num_workers=1")
    run = tmp_path / "runs" / "relayout"
    d = _checkpoint(run, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)  # no DeepSpeed files
    with pytest.raises(RelayoutError, match="ZeRO stage 2 checkpoint without optimizer partition files"):
        prepare(newest_layout(str(run)), str(run), None, 1, 0, "ckpt")
    with pytest.raises(
        ConfigError, match=r"^cluster.num_workers / deepspeed.zero_stage: .*checkpoint_2026.*--fresh"
    ):
        check_resume_layout(job, run)
    assert not (d / UNIVERSAL_DIR).exists()  # nothing half-converted is left
    assert check_resume_layout(make_job(tmp_path / "data", tmp_path / "runs", "relayout"), run) is None


def test_a_damaged_checkpoint_is_not_converted(tmp_path):
    d = _checkpoint(tmp_path, "checkpoint_2026-11-30_10-00-00.000000", world=2, stage=2)
    (d / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"y")
    with pytest.raises(RelayoutError, match="does not verify.*sha256"):
        prepare(newest_layout(str(tmp_path)), str(tmp_path), None, 1, 0, "ckpt")
