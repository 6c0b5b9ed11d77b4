"""Checkpoints: each rank saves its DeepSpeed shard into its own directory and reports it to Ray Train,
which merges the ranks' files into one checkpoint in the run's storage. Our own state (step, teacher/EMA,
data position) rides along, so a resumed or restarted job continues exactly where the checkpoint was.

Every rank also writes a manifest of its files (twinflow.train.manifest). A restore verifies it and
skips a corrupted or truncated checkpoint, with a line naming it and the bad file, falling back to
the newest checkpoint of the run that verifies.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinflow.train import manifest

log = logging.getLogger(__name__)

TAG = "ckpt"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's directory names inside the run's storage


class CheckpointError(RuntimeError):
    """Checkpoints exist but none verifies; the message names each one and why."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_seen": self.samples_seen,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            **{k: d[k] for k in ("step", "epoch", "batches_in_epoch", "samples_seen") if k in d},
            extra=d.get("extra", {}),
        )


def save(engine, teacher, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """Save this rank's shard with its manifest and report it (all ranks call this at the same step)."""
    import ray.train

    world = ray.train.get_context().get_world_size()
    tmp = Path(tempfile.mkdtemp(prefix=f"twinflow-ckpt-s{state.step}-r{rank}-"))
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state={"train_state": state.as_dict()})
        if teacher is not None:
            teacher.save(tmp)  # every rank: its own partition of the averages
        # last: it vouches for the files above
        manifest.write_manifest(tmp, rank, world, state.step, engine.zero_optimization_stage())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_dirs(run_uri: str, endpoint: str | None = None):
    """(filesystem, the run's `checkpoint_*` directories newest first: Ray names them by time)."""
    import pyarrow.fs as pafs

    from twinflow.storage import open_filesystem

    fs, base = open_filesystem(run_uri, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    dirs = sorted(
        (
            i.path
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
        ),
        reverse=True,
    )
    return fs, dirs


def candidates(latest, run_uri: str | None, endpoint: str | None = None) -> list:
    """Checkpoints to try, best first: Ray's latest, then the run's other checkpoint directories
    newest first (Ray names them by time). The directories count even when Ray registered none: a
    worker group restarted after losing a machine found no registered checkpoint although step 4's
    was complete in storage, and started over. (`--fresh` deletes the run's directory.)"""
    out = [latest] if latest is not None else []
    if run_uri is None:
        return out
    import ray.train

    fs, dirs = checkpoint_dirs(run_uri, endpoint)
    seen = {str(latest.path).rstrip("/")} if latest is not None else set()
    out += [ray.train.Checkpoint(path=d, filesystem=fs) for d in dirs if d.rstrip("/") not in seen]
    return out


def newest_layout(run_uri: str, endpoint: str | None = None) -> tuple[str, int, int | None] | None:
    """(checkpoint, world size, ZeRO stage) of the run's newest checkpoint with a readable rank-0
    manifest, read without downloading the checkpoint; None when it has none."""
    import json

    fs, dirs = checkpoint_dirs(run_uri, endpoint)
    for d in dirs:
        try:
            with fs.open_input_stream(f"{d}/{manifest.manifest_name(0)}") as fh:
                body = json.loads(fh.read())
            return d, int(body["world"]), body.get("zero_stage")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # cut off or damaged: the restore skips it too
    return None


def check_layout(run_uri: str, endpoint: str | None, world: int, zero_stage: int) -> None:
    """Refuse, before any worker starts, to resume a checkpoint whose optimizer state is laid out for
    another world size or ZeRO stage: DeepSpeed would fail deep inside its load with an unrelated
    error ("'NoneType' object has no attribute 'copy'") after Ray Train's retries."""
    found = newest_layout(run_uri, endpoint)
    if found is None:
        return
    path, saved_world, saved_stage = found
    same_stage = saved_stage is None or saved_stage == zero_stage
    if saved_world == world and same_stage:
        return
    was = f"{saved_world} worker(s)" + (f", ZeRO stage {saved_stage}" if saved_stage is not None else "")
    raise CheckpointError(
        f"cannot resume {path}: it was written by {was}, and this run has {world} worker(s), ZeRO stage "
        f"{zero_stage} (one worker runs ZeRO-1/2 as stage 0); the optimizer state does not carry over. "
        f"Resume with the run's cluster.num_workers and deepspeed.zero_stage, or rerun with --fresh "
        f"(deletes the run) or another name."
    )


def restore(
    engine, teacher, run_uri: str | None = None, endpoint: str | None = None, log_file: Path | None = None
) -> TrainState | None:
    """Load the newest checkpoint that verifies into the engine and teacher; None on a fresh start.

    `run_uri` (the run's storage directory) lets a restore fall back past a bad latest checkpoint;
    `log_file` (rank 0) gets every skip and the restore, one line each, besides stdout."""
    import ray.train

    def note(line: str) -> None:
        if log_file is None:
            return
        log.info(line)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as fh:
            fh.write(time.strftime("%Y-%m-%dT%H:%M:%SZ ", time.gmtime()) + line + "\n")

    tried = candidates(ray.train.get_checkpoint(), run_uri, endpoint)
    if not tried:
        return None
    skipped = []
    for ckpt in tried:
        with ckpt.as_directory() as d:
            problems = manifest.verify(d)
            if problems:
                skipped.append(f"{ckpt.path}: {'; '.join(problems[:3])}")
                note(f"skipping checkpoint {ckpt.path}: {'; '.join(problems[:3])}")
                continue
            load_path, client = engine.load_checkpoint(d, tag=TAG)
            if load_path is None:
                raise CheckpointError(f"checkpoint {ckpt.path} holds no DeepSpeed state under tag {TAG!r}")
            if teacher is not None:
                teacher.load(d)
            state = TrainState.from_dict(client["train_state"])
            note(f"{'fell back to' if skipped else 'restored'} checkpoint {ckpt.path} (step {state.step})")
        return state
    raise CheckpointError(
        "no checkpoint of this run verifies:\n  "
        + "\n  ".join(skipped)
        + "\nrerun with --fresh to start over (this deletes them)"
    )
