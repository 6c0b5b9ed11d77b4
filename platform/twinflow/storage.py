"""Local paths and s3:// URIs behind one pyarrow filesystem, so shards, caches and checkpoints share code.

The S3 endpoint comes from an explicit argument, else ``TWINFLOW_S3_ENDPOINT``, else
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (so a MinIO, moto or other S3-protocol server works);
credentials are never handed to the filesystem object: the AWS SDK inside pyarrow resolves them
where each call runs, through the standard chain (``AWS_*`` environment variables, the shared
credentials file, web identity, the instance or pod role). A filesystem built with explicit keys
carries them into every pickle of it (Ray Tune's tuner.pkl, Train's run state, task arguments),
so anyone who can read a sweep prefix would read the keys; one resolved by the chain pickles
only the endpoint and region. Each process (driver, Ray worker, Serve replica) therefore needs the
credentials in its own environment or role, as a KubeRay pod gets them from its secret.
One S3 filesystem is built per (endpoint, region) and process, and reused by every call.

Used by every layer that reads or writes outside the process: data (shards, caches), train
(checkpoints, exports), eval, tune and serve (exports via `twinflow.export_reader`).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV_VARS = ("TWINFLOW_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StorageError(OSError):
    """A storage location is unusable (missing path or bucket, bad URI, unreachable endpoint)."""


class MissingPathError(StorageError, FileNotFoundError):
    """A path or bucket that must exist does not; the message says which and where we looked."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def resolve_endpoint(endpoint: str | None = None) -> str | None:
    if endpoint:
        return endpoint
    for var in ENDPOINT_ENV_VARS:
        value = os.environ.get(var)
        if value:
            return value
    return None


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket = parsed.netloc
    if not bucket:
        raise StorageError(f"{uri}: an s3 URI needs a bucket, e.g. s3://my-bucket/prefix")
    key = parsed.path.strip("/")
    return bucket, key


def s3_filesystem(endpoint: str | None = None) -> pafs.S3FileSystem:
    """The pyarrow S3 filesystem for ``endpoint`` (None: env vars, then AWS itself), cached per
    endpoint and region; credentials come from the AWS chain on every call, never from arguments."""
    return _s3_filesystem(
        resolve_endpoint(endpoint),
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


@lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region, "connect_timeout": 5.0, "request_timeout": 30.0}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not parsed.netloc:
            raise StorageError(f"S3 endpoint {endpoint!r}: expected http(s)://host:port")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def open_filesystem(uri: str | os.PathLike, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` (local path or s3://bucket/key) -> (pyarrow filesystem, path inside it).

    Local paths come back absolute; s3 paths come back as ``bucket/key``.
    """
    text = str(uri)
    if is_s3(text):
        bucket, key = _split_s3(text)
        return s3_filesystem(endpoint), posixpath.join(bucket, key) if key else bucket
    if "://" in text and not text.startswith("file://"):
        raise StorageError(f"{text}: unsupported scheme (use a local path or s3://bucket/prefix)")
    if text.startswith("file://"):
        text = text[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an s3 URI (keeps the scheme)."""
    text = str(uri)
    if is_s3(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text).joinpath(*parts))


def _describe(uri: str, endpoint: str | None) -> str:
    if is_s3(uri):
        ep = resolve_endpoint(endpoint)
        return f"{uri} (endpoint {ep or 'AWS default'})"
    return uri


def _info(fs: pafs.FileSystem, path: str, uri: str, endpoint: str | None) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"cannot reach {_describe(uri, endpoint)}: {exc}") from None


def exists(uri: str | os.PathLike, endpoint: str | None = None) -> bool:
    fs, path = open_filesystem(uri, endpoint)
    return _info(fs, path, str(uri), endpoint).type != pafs.FileType.NotFound


def check_bucket(uri: str | os.PathLike, endpoint: str | None = None) -> None:
    """For s3 URIs, fail up front with one clear error when the bucket itself is missing."""
    text = str(uri)
    if not is_s3(text):
        return
    bucket, _ = _split_s3(text)
    fs = s3_filesystem(endpoint)
    if _info(fs, bucket, text, endpoint).type == pafs.FileType.NotFound:
        raise MissingPathError(
            f"bucket {bucket!r} does not exist at {_describe(text, endpoint)}; "
            f"create it first (e.g. `aws s3 mb s3://{bucket}`)"
        )


def require(uri: str | os.PathLike, endpoint: str | None = None, what: str = "path") -> None:
    """Raise MissingPathError unless ``uri`` exists (checks the bucket first for s3)."""
    check_bucket(uri, endpoint)
    if not exists(uri, endpoint):
        raise MissingPathError(f"{what} not found: {_describe(str(uri), endpoint)}")


def makedirs(uri: str | os.PathLike, endpoint: str | None = None) -> None:
    """Create a directory (local) or check the bucket (s3: prefixes need no creation)."""
    check_bucket(uri, endpoint)
    fs, path = open_filesystem(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike, endpoint: str | None = None) -> bytes:
    fs, path = open_filesystem(uri, endpoint)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise MissingPathError(f"not found: {_describe(str(uri), endpoint)}") from None


def write_bytes(uri: str | os.PathLike, data: bytes, endpoint: str | None = None) -> None:
    fs, path = open_filesystem(uri, endpoint)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def list_files(uri: str | os.PathLike, endpoint: str | None = None) -> list[str]:
    """Relative paths of every file under ``uri`` (recursive), sorted."""
    fs, root = open_filesystem(uri, endpoint)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    rels = [posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File]
    return sorted(rels)


def delete_dir(uri: str | os.PathLike, endpoint: str | None = None) -> None:
    """Remove a directory tree if it exists (local or s3 prefix)."""
    fs, path = open_filesystem(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, uri: str, endpoint: str | None = None) -> int:
    """Copy a local directory tree to ``uri`` (local or s3); returns the number of files copied."""
    src = Path(local_dir)
    if not src.is_dir():
        raise MissingPathError(f"local directory not found: {src}")
    makedirs(uri, endpoint)
    dst_fs, dst = open_filesystem(uri, endpoint)
    pafs.copy_files(
        str(src.resolve()), dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst_fs
    )
    return sum(1 for p in src.rglob("*") if p.is_file())


def download_dir(uri: str, local_dir: str | os.PathLike, endpoint: str | None = None) -> int:
    """Copy the tree under ``uri`` into ``local_dir``; returns the number of files copied."""
    require(uri, endpoint, what="directory")
    src_fs, src = open_filesystem(uri, endpoint)
    dst = Path(local_dir)
    dst.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        src, str(dst.resolve()), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return sum(1 for p in dst.rglob("*") if p.is_file())


def download_once(uri: str, target: str | os.PathLike, endpoint: str | None = None) -> Path:
    """``target``, holding the tree under ``uri``: downloaded unless already there. The download lands
    in a temporary sibling and is renamed into place, so a crashed or concurrent download never leaves
    a half-written folder that a later call would trust."""
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if download_dir(uri, tmp, endpoint) == 0:
            raise MissingPathError(f"no files under {_describe(uri, endpoint)}")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same download first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
