"""Find an export and what its run was trained on (`twinflow eval`'s inputs), without Ray.

Shared by the text-to-image job (`job.py`, Ray Data) and the editor evaluation (`edits.py`, in
process), so both resolve checkpoints, their data and their errors the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twinflow import storage
from twinflow.eval.datasets import SOURCE_TYPES


class EvalInputError(ValueError):
    """Bad input to `twinflow eval`: a missing checkpoint, an unknown dataset, a bad NFE list, ..."""


def read_json(uri: str, endpoint: str | None) -> dict[str, Any] | None:
    try:
        if not storage.exists(uri, endpoint):
            return None
        return json.loads(storage.read_bytes(uri, endpoint))
    except (OSError, ValueError):
        return None


def find_export(path: str, endpoint: str | None = None) -> tuple[str, dict[str, Any]]:
    """(export uri, twinflow.json) for an export folder or a run folder holding `export/`."""
    uri = str(path).rstrip("/") if storage.is_s3(path) else str(Path(path).expanduser().resolve())
    if storage.is_s3(uri):
        try:
            storage.check_bucket(uri, endpoint)
        except (OSError, ValueError) as exc:
            raise EvalInputError(f"checkpoint {path}: {exc}") from None
    elif not Path(uri).exists():
        raise EvalInputError(f"checkpoint {path} does not exist")
    for cand in (uri, storage.join(uri, "export")):
        meta = read_json(storage.join(cand, "twinflow.json"), endpoint)
        if meta is not None:
            if meta.get("format_version") != 1:
                raise EvalInputError(
                    f"checkpoint {cand}: twinflow.json format_version "
                    f"{meta.get('format_version')!r}, this code reads 1"
                )
            return cand, meta
    base = uri.rstrip("/").rsplit("/", 1)[-1]
    hint = (
        " (a Ray Train checkpoint holds DeepSpeed shards; evaluate the run's export/ folder instead)"
        if base.startswith("checkpoint_")
        else " (expected an export folder written by `twinflow train`, e.g. runs/<job>/export)"
    )
    raise EvalInputError(f"checkpoint {path} is not a TwinFlow export: no twinflow.json{hint}")


def job_data(export_uri: str, endpoint: str | None = None) -> tuple[str, str | None] | None:
    """(shards path, its endpoint) the run was trained on: the run's job.json `data.path`,
    a relative one resolved against the cwd, then the run's root (None when neither has a manifest)."""
    run = export_uri.rstrip("/").rsplit("/", 1)[0]
    data = (read_json(storage.join(run, "job.json"), endpoint) or {}).get("data") or {}
    path, ep = data.get("path"), data.get("s3_endpoint") or endpoint
    if not path:
        return None
    if storage.is_s3(path) or Path(path).is_absolute():
        return path, ep
    for cand in (str(Path.cwd() / path), str(Path(run).parent.parent / path)):
        if read_json(storage.join(cand, "manifest.json"), ep) is not None:
            return cand, ep
    return None


def infer_dataset(export_uri: str, endpoint: str | None = None) -> str | None:
    """The dataset a checkpoint was trained on: the run's job.json -> data.path -> manifest source type."""
    found = job_data(export_uri, endpoint)
    if found is None:
        return None
    manifest = read_json(storage.join(found[0], "manifest.json"), found[1]) or {}
    return SOURCE_TYPES.get((manifest.get("source") or {}).get("type"))
