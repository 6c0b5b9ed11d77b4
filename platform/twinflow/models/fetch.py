"""Model directories given as s3:// URIs are downloaded once into a local cache and used from there.

diffusers and transformers load only from local directories, so `pretrained_path`, `vae_path` and
`text_encoder_path` pass through `local_model_dir`. The cache key is the URI; a download lands in a
temporary sibling and is renamed into place, so a crashed or concurrent download never leaves a
half-written directory that a later run would trust. A caller that needs one component (a data
actor needs text_encoder/ and tokenizer/, not a 40 GB transformer) asks for that part alone.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from twinflow import storage

CACHE_ENV = "TWINFLOW_MODEL_CACHE"


def cache_root() -> Path:
    """`$TWINFLOW_MODEL_CACHE`, else ~/.cache/twinflow/models."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "twinflow" / "models")


def _cache_path(uri: str) -> Path:
    uri = uri.rstrip("/")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / f"{uri.rsplit('/', 1)[-1] or 'model'}-{key}"


def _download(uri: str, target: Path) -> Path:
    return storage.download_once(uri, target)


def is_remote(path: str | os.PathLike) -> bool:
    return storage.is_s3(path)


def local_model_dir(path: str | os.PathLike, part: str | None = None) -> Path:
    """`path` (or its subfolder `part`) as a local directory: itself when local, else a cached copy.

    For s3:// with `part`, only that subfolder is downloaded unless the whole prefix is cached already.
    """
    if not is_remote(path):
        return Path(path) if part is None else Path(path) / part
    uri = str(path).rstrip("/")
    whole = _cache_path(uri)
    if part is None or whole.is_dir():
        return _download(uri, whole) if part is None else whole / part
    return _download(f"{uri}/{part}", _cache_path(f"{uri}/{part}"))
