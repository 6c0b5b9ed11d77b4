"""Data: the shard format, pipeline builders, Ray Data streaming and bad-record accounting.

Importing this package is cheap (no Ray): the streaming names load on first use.
"""

from __future__ import annotations

from typing import Any

from twinflow.data.bad_records import BadDataError, BadRecord, BadRecordLog
from twinflow.data.config import DataConfig, PipelineConfig, load_pipeline
from twinflow.storage import MissingPathError, StorageError, open_filesystem

_LAZY = {
    "build_pipeline": "twinflow.data.build",
    "BuildResult": "twinflow.data.build",
    "Manifest": "twinflow.data.shards",
    "read_manifest": "twinflow.data.shards",
    "iter_local_records": "twinflow.data.local",
    "iter_local_batches": "twinflow.data.local",
    "build_train_dataset": "twinflow.data.streaming",
    "iter_torch_kwargs": "twinflow.data.streaming",
    "bad_record_report": "twinflow.data.streaming",
    "bad_record_metrics": "twinflow.data.streaming",
    "build_embed_cache": "twinflow.data.embed_cache",
    "TextEmbedStage": "twinflow.data.embed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'twinflow.data' has no attribute {name!r}")


__all__ = [
    "BadDataError",
    "BadRecord",
    "BadRecordLog",
    "DataConfig",
    "MissingPathError",
    "PipelineConfig",
    "StorageError",
    "load_pipeline",
    "open_filesystem",
    *_LAZY,
]
