"""Checkpoints: each rank saves its DeepSpeed shard into its own directory and reports it to Ray Train,
which merges the ranks' files into one checkpoint in the run's storage. Our own state (step, teacher/EMA,
data position) rides along, so a resumed or restarted job continues exactly where the checkpoint was.

Every rank also writes a manifest of its files (twinflow.train.manifest). A restore verifies it and
skips a corrupted or truncated checkpoint, with a line naming it and the bad file, falling back to
the newest checkpoint of the run that verifies. A checkpoint written by another worker count or ZeRO
stage loads through its universal conversion (twinflow.train.relayout), made before Ray started.

The averages (teacher/EMA, `train.averages`) are one file per rank of plain tensors and numbers,
loaded with weights_only=True.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from twinflow import storage
from twinflow.train import manifest, relayout

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_seen": self.samples_seen,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**{k: d[k] for k in ("step", "epoch", "batches_in_epoch", "samples_seen") if k in d})


def save(engine, teacher, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """Save this rank's shard with its manifest and report it (all ranks call this at the same step)."""
    import ray.train

    world = ray.train.get_context().get_world_size()
    tmp = Path(tempfile.mkdtemp(prefix=f"twinflow-ckpt-s{state.step}-r{rank}-"))
    client = {"train_state": state.as_dict(), relayout.TRAINABLE_KEY: trainable_names(engine.module)}
    try:
        engine.save_checkpoint(str(tmp), tag=TAG, client_state=client)
        if teacher is not None:
            teacher.save(tmp)  # every rank: its own partition of the averages
        # last: it vouches for the files above
        manifest.write_manifest(tmp, rank, world, state.step, engine.zero_optimization_stage())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trainable_names(module: torch.nn.Module) -> list[str]:
    """The optimizer's parameters by name, in its order (the loop hands DeepSpeed the trainable
    parameters in module order): a one-worker checkpoint's plain optimizer state is keyed by position."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


def checkpoint_dirs(run_uri: str, endpoint: str | None = None):
    """(filesystem, the run's `checkpoint_*` directories newest first: Ray names them by time)."""
    fs, base = storage.open_filesystem(run_uri, endpoint)  # looked up here: tests swap it
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


def layout_of(directory: str | Path) -> tuple[int, int | None] | None:
    """(world size, ZeRO stage) a checkpoint's manifests record; None without them."""
    manifests, _ = manifest.read_manifests(directory)
    if not manifests:
        return None
    body = manifests[min(manifests)]
    return body["world"], body.get("zero_stage")


def same_layout(saved: tuple[int, int | None], here: tuple[int, int]) -> bool:
    """The optimizer state's partitioning is the same (a manifest without a stage: the world decides)."""
    return saved[0] == here[0] and (saved[1] is None or saved[1] == here[1])


def describe(layout: tuple[int, int | None]) -> str:
    world, stage = layout
    return f"{world} worker(s)" + (f" at ZeRO stage {stage}" if stage is not None else "")


class Unusable(Exception):
    """This checkpoint cannot be restored (the message says why); a restore tries the next one."""


def load_directory(engine, teacher, directory: str | Path) -> tuple[TrainState, str]:
    """Verify one checkpoint directory and load it: its native files when this engine has the layout
    that wrote it, its universal conversion otherwise. (state, how it was loaded: "" when native)."""
    problems = manifest.verify(directory)
    if problems:
        raise Unusable("; ".join(problems[:3]))
    saved = layout_of(directory)
    here = (engine.dp_world_size, engine.zero_optimization_stage())
    if saved is None or same_layout(saved, here):
        load_path, client = engine.load_checkpoint(str(directory), tag=TAG)
        if load_path is None:
            raise CheckpointError(f"checkpoint {directory} holds no DeepSpeed state under tag {TAG!r}")
        how = ""
    else:
        bad = relayout.verify(directory)
        if bad:
            raise Unusable(
                f"written by {describe(saved)}, this run has {describe(here)}, and its universal "
                f"conversion does not verify: {'; '.join(bad[:3])}"
            )
        client = relayout.load(engine, directory, TAG)
        how = f" through its universal conversion ({describe(saved)} -> {describe(here)})"
    if teacher is not None:
        teacher.load(directory)  # each rank's averages file, loaded with weights_only=True
    return TrainState.from_dict(client["train_state"]), how


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
            try:
                state, how = load_directory(engine, teacher, d)
            except Unusable as exc:
                skipped.append(f"{ckpt.path}: {exc}")
                note(f"skipping checkpoint {ckpt.path}: {exc}")
                continue
            note(
                f"{'fell back to' if skipped else 'restored'} checkpoint {ckpt.path} (step {state.step}){how}"
            )
        return state
    raise CheckpointError(
        "no checkpoint of this run verifies:\n  "
        + "\n  ".join(skipped)
        + "\nrerun with --fresh to start over (this deletes them)"
    )
