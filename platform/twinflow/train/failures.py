"""Why a job failed, in full: logs/errors.log in the run directory.

Ray Train raises one message for a failed worker group, with each rank's traceback cut to its first
and last 500 characters (the middle, where the cause usually is, becomes '...'), and the exceptions
it hands the driver have lost their tracebacks on the way. So each worker appends its own full
traceback before the error leaves it, and the driver appends what it received (which still covers a
worker that died without a word, e.g. with its machine)."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

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
