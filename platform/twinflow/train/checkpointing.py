"""Checkpoints: each rank saves its DeepSpeed shard into its own directory and reports it to Ray Train,
which merges the ranks' files into one checkpoint in the run's storage. Our own state (step, teacher/EMA,
data position) rides along, so a resumed or restarted job continues exactly where the checkpoint was.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TAG = "ckpt"
TEACHER_FILE = "teacher.pt"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "samples_seen": self.samples_seen, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: d[k] for k in ("step", "epoch", "batches_in_epoch", "samples_seen") if k in d},
                   extra=d.get("extra", {}))


def save(engine, teacher, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """Save this rank's shard and report it (all ranks call this at the same step)."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix=f"twinflow-ckpt-s{state.step}-r{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={"train_state": state.as_dict()})
        if rank == 0 and teacher is not None and teacher.state_dict():
            torch.save(teacher.state_dict(), tmp / TEACHER_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine, teacher) -> TrainState | None:
    """Load the latest reported checkpoint into the engine and teacher; None on a fresh start."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        load_path, client = engine.load_checkpoint(d, tag=TAG)
        if load_path is None:
            raise RuntimeError(f"checkpoint {ckpt.path} holds no DeepSpeed state under tag {TAG!r}")
        teacher_file = Path(d) / TEACHER_FILE
        if teacher is not None and teacher_file.exists():
            teacher.load_state_dict(torch.load(teacher_file, map_location="cpu", weights_only=False))
    return TrainState.from_dict(client["train_state"])
