"""Open a TwinFlow export wherever it lives: the one way serve, eval, tune, training and the demo do it.

`open_export(uri)` gives the export's local folder (an s3:// export is downloaded once into the export
cache: $TWINFLOW_EXPORT_CACHE, default ~/.cache/twinflow/exports), its `twinflow.json`, and on demand
its generator, VAE codec, caption encoder and sampler settings. `read_export_metadata` reads the
metadata of a local or s3:// export without downloading the weights.

`shared_text_encoder` is the process's one cache of caption encoders (one per caption length, model
and device), so Serve's replicas, eval's actors, tune's evaluation task and training's periodic eval
each load MiniLM once however many exports they open.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinflow import storage
from twinflow.method.config import sample_guidance_of
from twinflow.models.export_layout import META_FILE, read_metadata
from twinflow.models.export_loader import load_export_codec, load_generator
from twinflow.models.text_encoder import (
    TextEncoder,
    export_text_encoder_spec,
    open_text_encoder,
    text_encoder_for_dir,
)

CACHE_ENV = "TWINFLOW_EXPORT_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "twinflow" / "exports"))


def read_export_metadata(uri: str | os.PathLike, endpoint: str | None = None) -> dict[str, Any]:
    """twinflow.json of a local or s3:// export (format checked), without downloading the weights."""
    if not storage.is_s3(uri):
        return read_metadata(uri)
    try:
        meta = json.loads(storage.read_bytes(storage.join(str(uri), META_FILE), endpoint))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not a TwinFlow export (no {META_FILE})") from None
    if meta.get("format_version") != 1:
        raise ValueError(
            f"{uri}/{META_FILE}: format_version {meta.get('format_version')!r}, this code reads 1"
        )
    return meta


def local_export(
    uri: str | os.PathLike, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A local folder holding the export: the path itself, or the cached download of an s3:// export."""
    if not storage.is_s3(uri):
        return Path(uri)
    source = str(uri).rstrip("/")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    return storage.download_once(source, root / hashlib.sha256(source.encode()).hexdigest()[:16], endpoint)


@dataclass
class Export:
    """An export on local disk: metadata now, weights when asked for."""

    uri: str  # as given (local path or s3://...)
    path: Path  # the local folder
    meta: dict[str, Any]

    @property
    def method(self) -> str | None:
        return self.meta.get("method")

    @property
    def sample_guidance(self) -> float:
        """The CFG it is meant to be sampled with: a flow-matching base's `sample_guidance`, else 0."""
        return sample_guidance_of(self.meta.get("method_config"))

    @property
    def text_max_length(self) -> int:
        return int(self.meta["text_encoder"]["max_length"])

    def generator(self, torch_dtype=None):
        return load_generator(self.path, torch_dtype)[0]

    def codec(self):
        """The VAE saved beside a latent-space export (None for pixel models)."""
        return load_export_codec(self.path) if self.meta.get("latent") else None

    @property
    def text_encoder_spec(self) -> dict[str, Any]:
        """Which caption encoder it was trained with (`open_text_encoder` builds it)."""
        return export_text_encoder_spec(self.path, self.meta)

    def text_encoder(self, device: str = "cpu") -> TextEncoder:
        """The caption encoder it was trained with (MiniLM, or Qwen-Image's Qwen2.5-VL)."""
        return shared_text_encoder(self.text_max_length, device=device, spec=self.text_encoder_spec)


def open_export(
    uri: str | os.PathLike, endpoint: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Export:
    """The export at `uri` (a local folder or s3://...), downloaded once when remote."""
    path = local_export(uri, endpoint, cache_dir)
    return Export(str(uri), path, read_metadata(path))


_ENCODERS: dict[tuple, TextEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def shared_text_encoder(
    max_length: int,
    model_dir: str | None = None,
    device: str = "cpu",
    cache_size: int = 4096,
    spec: dict[str, Any] | None = None,
) -> TextEncoder:
    """The process's caption encoder for these settings (made once; thread-safe).

    `spec` (`export_text_encoder_spec`, `ModelConfig.text_encoder_spec`) picks a non-default encoder
    such as Qwen2.5-VL and carries the null prompt (the empty caption without a spec); a MiniLM spec
    keeps `model_dir` for the weights and takes only its null prompt."""
    null_prompt = (spec or {}).get("null_prompt", "")
    spec = spec if spec is not None and spec.get("kind", "minilm") != "minilm" else None
    key = (
        int(max_length),
        model_dir,
        str(device),
        int(cache_size),
        json.dumps(spec, sort_keys=True),
        null_prompt,
    )
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = (
                open_text_encoder(spec, int(max_length), device, cache_size)
                if spec is not None
                else text_encoder_for_dir(model_dir, int(max_length), device, cache_size, null_prompt)
            )
        return _ENCODERS[key]
