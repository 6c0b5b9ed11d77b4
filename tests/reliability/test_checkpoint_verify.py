"""Defects 1 and 2: a corrupted checkpoint was restored silently; a truncated one failed without
naming a file and never fell back. Checkpoints now carry per-rank manifests checked before a restore."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from twinflow.train import checkpointing, manifest
from twinflow.train.summary import write_summary


def make_checkpoint(root: Path, step: int, world: int = 2) -> Path:
    """A checkpoint laid out like a merged Ray Train one: each rank's files plus its manifest."""
    for rank in range(world):
        part = root / f".rank{rank}"
        (part / "ckpt").mkdir(parents=True)
        torch.save(
            {"w": torch.full((64, 64), float(step + rank))}, part / "ckpt" / f"zero_rank{rank}_states.pt"
        )
        if rank == 0:
            (part / "latest").write_text("ckpt")
        manifest.write_manifest(part, rank, world, step)
        for p in part.rglob("*"):
            if p.is_file():
                dest = root / p.relative_to(part)
                dest.parent.mkdir(parents=True, exist_ok=True)
                p.rename(dest)
    return root


def corrupt(path: Path, offset: int = 200, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = os.urandom(min(n, len(data) - offset))
    path.write_bytes(bytes(data))


def test_a_clean_checkpoint_verifies(tmp_path):
    ck = make_checkpoint(tmp_path / "c", step=4)
    assert manifest.verify(ck) == []
    assert manifest.manifest_step(ck) == 4


def test_random_bytes_inside_a_tensor_file_are_caught_and_named(tmp_path):
    ck = make_checkpoint(tmp_path / "c", step=4)
    corrupt(ck / "ckpt" / "zero_rank1_states.pt")
    problems = manifest.verify(ck)
    assert problems and "ckpt/zero_rank1_states.pt" in problems[0] and "sha256" in problems[0]


def test_a_truncated_file_is_caught_and_named(tmp_path):
    ck = make_checkpoint(tmp_path / "c", step=4)
    f = ck / "ckpt" / "zero_rank0_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    assert any("zero_rank0_states.pt" in p and "truncated" in p for p in manifest.verify(ck))


def test_missing_manifest_or_rank_or_file_fails(tmp_path):
    ck = make_checkpoint(tmp_path / "a", step=2)
    (ck / manifest.manifest_name(1)).unlink()
    assert any("rank(s) [1]" in p for p in manifest.verify(ck))
    ck = make_checkpoint(tmp_path / "b", step=2)
    for m in ck.glob("manifest.rank*.json"):
        m.unlink()
    assert "no manifest.rank0.json" in manifest.verify(ck)[0]
    ck = make_checkpoint(tmp_path / "c", step=2)
    (ck / "ckpt" / "zero_rank1_states.pt").unlink()
    assert any("missing" in p for p in manifest.verify(ck))


class FakeEngine:
    """Records which checkpoint directory it loaded (a DeepSpeed engine's load_checkpoint contract),
    on the layout make_checkpoint writes (2 workers)."""

    dp_world_size = 2

    def __init__(self) -> None:
        self.loaded: Path | None = None

    def zero_optimization_stage(self) -> int:
        return 2

    def load_checkpoint(self, d, tag):
        self.loaded = Path(d)
        step = manifest.manifest_step(d)
        return str(d), {
            "train_state": {"step": step, "epoch": 0, "batches_in_epoch": step, "samples_seen": step}
        }


def _run_dir_with(tmp_path: Path, steps: list[int]) -> tuple[Path, list[Path]]:
    run = tmp_path / "run"
    dirs = [
        make_checkpoint(run / f"checkpoint_2026-11-30_00-00-{i:02d}.000000", s) for i, s in enumerate(steps)
    ]
    return run, dirs


def test_restore_falls_back_to_the_newest_good_checkpoint(tmp_path, monkeypatch, caplog):
    import ray.train

    caplog.set_level(logging.INFO, logger="twinflow.train.checkpointing")

    run, (c2, c4, c6) = _run_dir_with(tmp_path, [2, 4, 6])
    corrupt(c6 / "ckpt" / "zero_rank0_states.pt")  # the newest: random bytes
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(c6)))
    engine = FakeEngine()
    log = tmp_path / "checkpoints.log"
    state = checkpointing.restore(engine, None, str(run), log_file=log)
    assert state.step == 4 and engine.loaded == c4
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in (logged, log.read_text()):
        assert f"skipping checkpoint {c6}" in text and "zero_rank0_states.pt" in text
        assert f"fell back to checkpoint {c4} (step 4)" in text


def test_restore_refuses_when_nothing_verifies_and_names_every_checkpoint(tmp_path, monkeypatch):
    import ray.train

    run, (c2, c4) = _run_dir_with(tmp_path, [2, 4])
    corrupt(c2 / "ckpt" / "zero_rank1_states.pt")
    f = c4 / "ckpt" / "zero_rank0_states.pt"
    f.write_bytes(f.read_bytes()[:50])
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(c4)))
    engine = FakeEngine()
    with pytest.raises(checkpointing.CheckpointError) as err:
        checkpointing.restore(engine, None, str(run))
    assert str(c2) in str(err.value) and str(c4) in str(err.value) and engine.loaded is None


def test_a_complete_checkpoint_ray_never_registered_is_still_used(tmp_path, monkeypatch):
    """The drill's case: a machine died after step 4's checkpoint was in storage but before the
    controller registered it; the restarted group must not start over."""
    import ray.train

    run, (c2, c4) = _run_dir_with(tmp_path, [2, 4])
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    engine = FakeEngine()
    assert checkpointing.restore(engine, None, str(run)).step == 4 and engine.loaded == c4
    empty = tmp_path / "fresh"
    empty.mkdir()
    assert checkpointing.restore(FakeEngine(), None, str(empty)) is None  # a new (or --fresh) run
    assert checkpointing.restore(FakeEngine(), None, str(tmp_path / "missing")) is None


def test_summary_keeps_every_attempt_and_the_finished_record(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"ok": True, "state": "FINISHED", "steps": 4, "export_dir": "/x/export"}))
    body = write_summary(path, {"ok": False, "state": "ERRORED", "steps": 0, "error": "boom"})
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(body))
    assert on_disk["state"] == "ERRORED" and on_disk["error"] == "boom"
    assert [a["state"] for a in on_disk["attempts"]] == ["FINISHED", "ERRORED"]
    assert on_disk["finished"]["export_dir"] == "/x/export"


def test_export_refuses_non_finite_weights(tmp_path):
    from twinflow.models import ModelConfig, build_generator, save_generator

    gen = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=8))
    name, param = next(iter(gen.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        save_generator(gen, tmp_path / "export", {"method": "flow_matching"})
    assert not (tmp_path / "export").exists()
