"""Model directories given as s3:// URIs are downloaded once into a local cache and used from there.

diffusers and transformers load only from local directories, so `pretrained_path`, `vae_path` and
`text_encoder_path` pass through `local_model_dir`. The cache key is the URI; a download lands in a
temporary sibling and is renamed into place, so a crashed or concurrent download never leaves a
half-written directory that a later run would trust.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CACHE_ENV = "TWINFLOW_MODEL_CACHE"


def cache_root() -> Path:
    """`$TWINFLOW_MODEL_CACHE`, else ~/.cache/twinflow/models."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "twinflow" / "models")


def local_model_dir(path: str | os.PathLike) -> Path:
    """A local directory for `path`: itself when local, else the cached copy of the s3:// prefix."""
    from twinflow import storage

    uri = str(path)
    if not storage.is_s3(uri):
        return Path(uri)
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    target = cache_root() / f"{name}-{key}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if storage.download_dir(uri, tmp) == 0:
            raise FileNotFoundError(f"{uri}: no files under this prefix")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same download first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
