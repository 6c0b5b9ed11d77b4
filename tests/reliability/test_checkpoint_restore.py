"""`checkpointing.restore` on checkpoint directories laid out as Ray Train merges them, with a recording
engine: the averages come back as saved, the line each restore writes to `checkpoints.log`, a
checkpoint of another layout loaded through its universal conversion (or skipped, saying why), the
refusal when nothing verifies, and the train state read back whole. (Real DeepSpeed and Ray Train:
tests/train/test_zero3_kill_resume.py, test_relayout_deepspeed.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import ray.train
import torch
from torch import nn

from twinflow.train import averages as avg
from twinflow.train import checkpointing, manifest, relayout
from twinflow.train.checkpointing import TAG, TrainState

from .test_checkpoint_verify import corrupt, make_checkpoint

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "  # UTC, as the run's other logs


class Engine:
    """A DeepSpeed engine's restore contract: records what it was asked to load."""

    def __init__(self, world: int = 2, stage: int = 2, holds_state: bool = True) -> None:
        self.dp_world_size, self.stage, self.holds_state = world, stage, holds_state
        self.loads: list[tuple[Path, str]] = []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_checkpoint(self, d, tag):
        self.loads.append((Path(d), tag))
        if not self.holds_state:
            return None, None
        step = manifest.manifest_step(d)
        return str(d), {
            "train_state": {"step": step, "epoch": 1, "batches_in_epoch": step, "samples_seen": 16}
        }


def _averages(seed: int) -> avg.Averages:
    torch.manual_seed(seed)
    return avg.build(nn.Linear(4, 3), teacher_mode="ema", teacher_decay=0.9, sample_decay=0.8)


def _run(tmp_path: Path, steps: list[int], world: int = 2) -> tuple[Path, list[Path]]:
    run = tmp_path / "run"
    return run, [
        make_checkpoint(run / f"checkpoint_2026-11-30_00-00-{i:02d}.000000", s, world)
        for i, s in enumerate(steps)
    ]


def _latest(monkeypatch, path: Path | None) -> None:
    monkeypatch.setattr(
        ray.train, "get_checkpoint", lambda: None if path is None else ray.train.Checkpoint(str(path))
    )


def test_the_averages_and_the_train_state_come_back_as_saved_and_the_log_says_which(tmp_path, monkeypatch):
    run, (c2, c4) = _run(tmp_path, [2, 4])
    saved = _averages(0)
    for _ in range(3):  # past the decay warm-up's first updates
        saved.update_teacher()
        saved.update_sampling()
    saved.save(c2)
    _latest(monkeypatch, c2)  # Ray's registered checkpoint comes before a newer folder
    fresh, engine = _averages(1), Engine()
    log = tmp_path / "out" / "logs" / "checkpoints.log"  # neither folder exists yet
    state = checkpointing.restore(engine, fresh, str(run), log_file=log)
    assert state == TrainState(step=2, epoch=1, batches_in_epoch=2, samples_seen=16)
    assert engine.loads == [(c2, TAG)]
    want, got = saved.state_dict(), fresh.state_dict()
    for part in ("teacher", "sample_ema"):
        assert got[part]["schedule"] == want[part]["schedule"] and got[part]["schedule"]["num_updates"] == 3
        assert all(torch.equal(got[part]["shards"][n], s) for n, s in want[part]["shards"].items())
    assert re.fullmatch(f"{STAMP}restored checkpoint {re.escape(str(c2))} \\(step 2\\)\n", log.read_text())


def test_a_checkpoint_without_deepspeed_state_is_an_error_naming_it(tmp_path, monkeypatch):
    run, (c2,) = _run(tmp_path, [2])
    _latest(monkeypatch, None)
    with pytest.raises(checkpointing.CheckpointError) as err:
        checkpointing.restore(Engine(holds_state=False), None, str(run))
    assert str(err.value) == f"checkpoint {c2} holds no DeepSpeed state under tag {TAG!r}"


def test_another_layout_loads_through_its_universal_conversion(tmp_path, monkeypatch):
    run, (c2,) = _run(tmp_path, [2], world=1)  # written by one worker; this run has two at ZeRO-2
    calls = []
    monkeypatch.setattr(relayout, "verify", lambda d: calls.append(("verify", Path(d))) or [])

    def load(engine, directory, tag):
        calls.append(("load", engine, Path(directory), tag))
        return {"train_state": {"step": 2, "samples_seen": 8}}

    monkeypatch.setattr(relayout, "load", load)
    _latest(monkeypatch, c2)
    engine, log = Engine(), tmp_path / "checkpoints.log"
    assert checkpointing.restore(engine, None, str(run), log_file=log) == TrainState(step=2, samples_seen=8)
    assert engine.loads == [] and calls == [("verify", c2), ("load", engine, c2, TAG)]
    assert re.fullmatch(
        f"{STAMP}restored checkpoint {re.escape(str(c2))} \\(step 2\\) through its universal conversion "
        "\\(1 worker\\(s\\) -> 2 worker\\(s\\) at ZeRO stage 2\\)\n",
        log.read_text(),
    )


def test_a_conversion_that_does_not_verify_is_skipped_saying_why(tmp_path, monkeypatch):
    run, (c2, c4) = _run(tmp_path, [2, 4])
    old = make_checkpoint(tmp_path / "one" / "checkpoint_2026-11-30_00-00-09.000000", 6, world=1)
    newest = run / old.name
    old.rename(newest)
    problems = ["p1", "p2", "p3", "p4"]
    monkeypatch.setattr(relayout, "verify", lambda d: problems if Path(d) == newest else [])
    _latest(monkeypatch, newest)
    log, engine = tmp_path / "checkpoints.log", Engine()
    assert checkpointing.restore(engine, None, str(run), log_file=log).step == 4
    lines = log.read_text().splitlines()
    assert lines[0].endswith(
        f"skipping checkpoint {newest}: written by 1 worker(s), this run has 2 worker(s) at ZeRO stage 2, "
        "and its universal conversion does not verify: p1; p2; p3"
    )
    assert re.fullmatch(f"{STAMP}fell back to checkpoint {re.escape(str(c4))} \\(step 4\\)", lines[1])
    assert engine.loads == [(c4, TAG)]


def test_nothing_that_verifies_is_one_error_listing_each_skip(tmp_path, monkeypatch):
    """Each skip names its first three problems; these checkpoints have four each."""
    run = tmp_path / "run"
    dirs = []
    for i, step in enumerate((2, 4)):
        c = run / f"checkpoint_2026-11-30_00-00-{i:02d}.000000"
        (c / "ckpt").mkdir(parents=True)
        for k in range(4):
            torch.save({"w": torch.full((64, 64), float(k))}, c / "ckpt" / f"part{k}.pt")
        manifest.write_manifest(c, 0, 1, step)
        for k in range(4):
            corrupt(c / "ckpt" / f"part{k}.pt")
        dirs.append(c)
    _latest(monkeypatch, None)
    with pytest.raises(checkpointing.CheckpointError) as err:
        checkpointing.restore(Engine(world=1, stage=0), None, str(run))
    assert all(len(manifest.verify(c)) == 4 for c in dirs)
    skips = [f"{c}: {'; '.join(manifest.verify(c)[:3])}" for c in reversed(dirs)]
    assert str(err.value) == (
        "no checkpoint of this run verifies:\n  "
        + "\n  ".join(skips)
        + "\nrerun with --fresh to start over (this deletes them)"
    )


def test_the_endpoint_reaches_the_restores_listing(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    import twinflow.storage

    run, (c2,) = _run(tmp_path, [2])
    seen = []
    monkeypatch.setattr(
        twinflow.storage,
        "open_filesystem",
        lambda uri, endpoint=None: seen.append(endpoint) or (pafs.LocalFileSystem(), str(uri)),
    )
    _latest(monkeypatch, c2)
    assert checkpointing.restore(Engine(), None, str(run), "http://127.0.0.1:9000").step == 2
    assert seen == ["http://127.0.0.1:9000"]


def test_layouts_are_described_with_their_stage_when_known():
    assert checkpointing.describe((2, None)) == "2 worker(s)"
    assert checkpointing.describe((4, 3)) == "4 worker(s) at ZeRO stage 3"


def test_the_train_state_reads_every_field_back():
    full = {"step": 7, "epoch": 2, "batches_in_epoch": 5, "samples_seen": 112}
    assert TrainState.from_dict(full).as_dict() == full
    assert TrainState.from_dict({"step": 3}) == TrainState(step=3)
