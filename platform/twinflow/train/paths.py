"""Safe run names and the only way a run directory is ever deleted.

A job or sweep name becomes a path component under `output.dir` (or `storage`), and `--fresh` deletes
that component. A name like `..` or `.` once made `--fresh` delete the folder above the runs, or all of
them; so names are plain identifiers, and deletion re-checks, on the resolved path, that it touches
exactly one run directory inside its root and nothing a symlink points at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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
    if not uri.startswith("s3://"):
        raise UnsafePathError(f"{uri}: not an s3:// URI")
    parts = uri[len("s3://") :].split("/")
    if len(parts) < 2 or not parts[0] or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(
            f"{uri}: refusing to delete (needs s3://bucket/.../<run name>, no empty, '.' or '..' parts)"
        )
    return uri
