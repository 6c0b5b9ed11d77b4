"""Why a job failed, in full (logs/errors.log in the run directory), and which failures end it at once.

Ray Train raises one message for a failed worker group, with each rank's traceback cut to its first
and last 500 characters (the middle, where the cause usually is, becomes '...'), and the exceptions
it hands the driver have lost their tracebacks on the way. So each worker appends its own full
traceback before the error leaves it, and the driver appends what it received (which still covers a
worker that died without a word, e.g. with its machine).

Ray Train restarts a failed worker group up to `train.max_failures` times. An error that recurs on
every attempt (a missing file, an invalid config, a checkpoint that cannot be loaded) would spend
that budget failing the same way, minutes apart. `StopOnDeterministicFailure`, a Train callback,
sees each worker error before the restart decision and, for those, raises `DeterministicFailure`
in the controller instead, which Ray Train does not retry: the job ends at once and the driver
reports the worker's own message (`deterministic_message`).
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from ray.train import UserCallback

ERRORS_LOG = ("logs", "errors.log")


def errors_log(run_dir: str | Path) -> Path:
    return Path(run_dir).joinpath(*ERRORS_LOG)


def append_failure(run_dir: str | Path, who: str, text: str) -> Path:
    path = errors_log(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"=== {who}\n{text.rstrip()}\n\n")  # one write per entry: ranks append side by side
    return path


def train_loop_keeping_traceback(config: dict[str, Any]) -> None:
    """Ray Train's worker function: `twinflow.train.worker.train_loop`, whose traceback is kept."""
    import ray.train

    # the worker module imports DeepSpeed and the models: only Ray Train's worker process loads it
    from twinflow.train.worker import train_loop

    try:
        train_loop(config)
    except Exception:
        rank = ray.train.get_context().get_world_rank()
        append_failure(config["run_dir"], f"rank {rank} (worker traceback)", traceback.format_exc())
        raise


def write_failure_log(run_dir: Path, exc: BaseException) -> Path | None:
    """The driver's side: each failed rank's (or the controller's) error as Ray Train reported it."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures and getattr(exc, "controller_failure", None) is not None:
        failures = {"controller": exc.controller_failure}
    if not failures:
        return None
    for who, err in sorted(failures.items(), key=lambda kv: str(kv[0])):
        label = f"rank {who}" if isinstance(who, int) else str(who)
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        path = append_failure(run_dir, f"{label} (as the driver received it): {type(err).__name__}", text)
    return path


class DeterministicFailure(RuntimeError):
    """A worker error that would recur on every attempt; its message is the worker's own."""


def is_deterministic(exc: BaseException) -> bool:
    """Errors that depend only on the job's inputs: missing files, invalid configs or data, checkpoints
    that cannot be loaded. Everything else (lost workers, timeouts, OOM, collectives) is retried."""
    from pydantic import ValidationError

    # read only when a run fails: the error classes' modules import torch, PIL and pyarrow
    from twinflow.config import ConfigError
    from twinflow.eval.datasets import ReferenceDataError
    from twinflow.train.checkpointing import CheckpointError
    from twinflow.train.paths import UnsafePathError

    return isinstance(
        exc,
        (
            FileNotFoundError,
            NotADirectoryError,
            ConfigError,
            ValidationError,
            ReferenceDataError,
            CheckpointError,
            UnsafePathError,
        ),
    )


class StopOnDeterministicFailure(UserCallback):
    """Train callback (it runs in the controller): a deterministic worker error ends the run unretried."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, err in sorted(worker_exceptions.items()):
            if is_deterministic(err):
                raise DeterministicFailure(f"rank {rank}: {type(err).__name__}: {err}")


def deterministic_message(exc: BaseException) -> str | None:
    """The driver's side: the worker's message when Ray Train stopped on a `DeterministicFailure`."""
    cause = getattr(exc, "controller_failure", None)
    return str(cause) if isinstance(cause, DeterministicFailure) else None
