"""Files that are either wholly there or not at all: written to a temporary sibling, flushed, renamed.

A reader (a resumed run, `twinflow eval`, a dashboard, a sweep's report) never sees half a JSON file
after a crash or a full disk, and two writers of the same file leave one whole version.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where the OS shows it (changing it is racy)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically, with the mode a plain open() would have given it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from the group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> Path:
    """`json.dumps(data, **dump_kwargs)` written with `write_text_atomic`."""
    return write_text_atomic(path, json.dumps(data, **dump_kwargs))


def usual_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain mkdir() / open() would have: temporary
    folders (0700) and safetensors files (0600) would otherwise hide an export from the group."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask, follow_symlinks=False)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
