"""Safe run names and the only way a run directory is ever deleted.

A job or sweep name becomes a path component under `output.dir` (or `storage`), and `--fresh` deletes
that component. A name like `..` or `.` once made `--fresh` delete the folder above the runs, or all of
them; so names are plain identifiers, and deletion re-checks, on the resolved path, that it touches
exactly one run directory inside its root and nothing a symlink points at.

Also the check, before Ray starts, that a job reads no input from and writes no output into Ray's
runtime-env copy of its working directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from twinflow.config import ConfigError
from twinflow.storage import is_s3

# First character a letter or digit: no ".", "..", hidden names or "-option" look-alikes; no "/".
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
RUN_MARKER = "job.json"


class UnsafePathError(ValueError):
    """A destructive action would touch something outside the run's own directory."""


def check_run_dir(root: str | Path, name: str) -> Path:
    """`root/name` as an absolute path, after proving it is one plain directory level inside `root`."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise UnsafePathError(f"run name {name!r} is not a plain directory name")
    base = Path(root).expanduser().resolve()
    run = base / name
    if run.is_symlink():
        raise UnsafePathError(f"{run} is a symlink (to {run.resolve()}); refusing to delete through it")
    if run.resolve().parent != base or run.resolve() == base:
        raise UnsafePathError(f"{run} resolves to {run.resolve()}, not a directory inside {base}")
    return run


def remove_run_dir(root: str | Path, name: str, marker: str = RUN_MARKER) -> bool:
    """Delete the run directory `root/name` (True), or nothing when it does not exist (False).

    Refuses (UnsafePathError, nothing deleted) a name that leaves `root`, a symlinked run directory,
    and a non-empty directory without `marker`: such a folder was not made by a run.
    """
    run = check_run_dir(root, name)
    if not run.exists():
        return False
    if not run.is_dir():
        raise UnsafePathError(f"{run} is not a directory; refusing to delete it")
    if marker and any(run.iterdir()) and not (run / marker).is_file():
        raise UnsafePathError(
            f"{run} holds no {marker}: not a run directory; refusing to delete it "
            f"(move it away or pick another name)"
        )
    shutil.rmtree(run)
    return True


def check_remote_run(uri: str) -> str:
    """An s3:// run prefix `s3://bucket[/prefix]/name` with a bucket and a plain last component."""
    if not is_s3(uri):
        raise UnsafePathError(f"{uri}: not an s3:// URI")
    parts = uri[len("s3://") :].split("/")
    if len(parts) < 2 or not parts[0] or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(
            f"{uri}: refusing to delete (needs s3://bucket/.../<run name>, no empty, '.' or '..' parts)"
        )
    return uri


# `ray job submit --working-dir DIR` runs the driver (and the workers) in an unpacked copy of DIR:
# <ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash>/. The copy leaves out
# git-ignored folders (data/, runs/) and Ray deletes it when no job uses it any more.
RUNTIME_RESOURCES = "runtime_resources"


def runtime_env_root(cwd: str | Path | None = None) -> Path | None:
    """The `runtime_resources` folder this process runs inside (a Ray runtime-env working_dir), else None."""
    here = Path(cwd or os.getcwd()).resolve()
    for p in (here, *here.parents):
        if p.name == RUNTIME_RESOURCES or p.name.startswith("_ray_pkg_"):
            top = next((q for q in (p, *p.parents) if q.name == RUNTIME_RESOURCES), p)
            return top
    return None


def check_not_in_runtime_env(
    field: str, path: str, *, must_exist: bool, flag: str = "--set", cwd: str | Path | None = None
) -> None:
    """A ConfigError that says what to do when `path` (relative paths against `cwd`) lies in Ray's
    runtime-env folder: an input that is not there (the upload left it out), or any output (Ray deletes
    the folder). URIs (s3://...) and paths outside the folder pass."""
    root = runtime_env_root(cwd)
    if root is None or not path or "://" in path:
        return
    here = Path(cwd or os.getcwd()).resolve()
    resolved = (here / Path(path).expanduser()).resolve()
    if resolved != root and root not in resolved.parents:
        return
    where = (
        f"this job runs in a copy of its --working-dir that Ray unpacked into {here} "
        "(`ray job submit` leaves out git-ignored folders such as data/ and runs/)"
    )
    if must_exist and not resolved.exists():
        raise ConfigError(
            f"{field}: {path!r} is not in that copy: {where}. Give a path every node can read: an absolute "
            f"path on shared storage or s3://bucket/prefix, e.g. `{flag} {field}=/shared/...`"
        )
    if not must_exist:
        raise ConfigError(
            f"{field}: {path!r} would write inside {root}, which Ray deletes after the job: {where}. "
            f"Write to shared storage or s3://, e.g. `{flag} {field}=/shared/runs` or `{flag} {field}=s3://bucket/runs`"
        )
