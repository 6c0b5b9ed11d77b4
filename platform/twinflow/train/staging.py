"""The local staging root of runs whose output is on s3:// (logs, samples and the export wait here).

A fixed shared path would let any local user create `<tmp>/twinflow-staging/<job>` first, as a
folder they can read or a symlink into their own, and the run would write through it. So the default
is `<tmp>/twinflow-staging-<uid>`, created 0700 by its owner, and used only while it is a real
directory of this user that nobody else may write to. `TWINFLOW_STAGING_DIR` chooses another place (checked for
a symlink too, since the run directory under it is what `--fresh` deletes).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

STAGING_ENV = "TWINFLOW_STAGING_DIR"


class UnsafeStagingError(PermissionError):
    """The staging root could be read or redirected by another user."""


def private_dir(path: Path) -> Path:
    """`path` made (0700) or checked: a directory, not a symlink, owned by us, writable by us alone."""
    try:
        path.mkdir(mode=0o700, parents=False, exist_ok=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeStagingError(f"staging root {path} is not a plain directory (a symlink or a file)")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeStagingError(f"staging root {path} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH | stat.S_IRWXO):
        raise UnsafeStagingError(
            f"staging root {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"use a private folder (chmod 700) or set {STAGING_ENV}"
        )
    return path


def staging_root() -> Path:
    """Where s3:// runs stage locally: `$TWINFLOW_STAGING_DIR`, else a private per-user temp folder."""
    chosen = os.environ.get(STAGING_ENV)
    if chosen:
        root = Path(chosen).expanduser()
        if root.is_symlink():
            raise UnsafeStagingError(f"{STAGING_ENV}={chosen} is a symlink; name the real folder")
        return root.resolve()
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    return private_dir(Path(tempfile.gettempdir()) / f"twinflow-staging-{uid}").resolve()
