"""Data: the shard format, pipeline builders, Ray Data streaming and bad-record accounting.

Importing this package is cheap (no Ray): the streaming names load on first use.
"""

from __future__ import annotations

from twinflow.data.bad_records import BadDataError as BadDataError
from twinflow.data.bad_records import BadRecord as BadRecord
from twinflow.data.bad_records import BadRecordLog as BadRecordLog
from twinflow.data.config import DataConfig as DataConfig
from twinflow.data.config import PipelineConfig as PipelineConfig
from twinflow.data.config import load_pipeline as load_pipeline
from twinflow.lazy import lazy_names
from twinflow.storage import MissingPathError as MissingPathError
from twinflow.storage import StorageError as StorageError
from twinflow.storage import open_filesystem as open_filesystem

_NAMES = {
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

# the eager names above plus these, loaded on first use
__getattr__, _, _ = lazy_names(__name__, _NAMES)
