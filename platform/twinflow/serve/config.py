"""The Serve application's `args` (what a Serve config YAML passes to `twinflow.serve.app:build_app`).

Cheap to import (pydantic only): the CLI and the builder validate a config before Ray or torch load.
Deployment options (replicas, autoscaling, CPUs) are not here: they belong to the Serve config's
`deployments:` section, which overrides the defaults of the `TwinFlow` deployment by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from twinflow import storage

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEPLOYMENT = "TwinFlow"
DEFAULT_TOKEN_ENV = "TWINFLOW_SERVE_TOKEN"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelEntry(_Strict):
    """One checkpoint behind the deployment, chosen per request by `id`."""

    id: str = Field(description="model id used in requests (letters, digits, . _ -)")
    path: str = Field(
        description="a TwinFlow export dir (local path or s3://bucket/prefix); a LoRA export "
        "is served like any export (its transformer/ holds the merged adapter)"
    )
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not MODEL_ID_RE.match(v):
            raise ValueError(
                f"model id {v!r}: use 1-64 letters, digits, '.', '_' or '-' (first a letter or digit)"
            )
        return v


class Limits(_Strict):
    """Request bounds; anything outside is a 4xx JSON error."""

    min_nfe: int = Field(1, ge=1)
    max_nfe: int = Field(64, ge=1, le=1000)
    max_images: int = Field(8, ge=1, le=64, description="images per request")
    max_prompt_chars: int = Field(500, ge=1, le=100_000)
    max_guidance: float = Field(20.0, ge=0.0, le=1000.0, allow_inf_nan=False)
    max_image_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="decoded size of an uploaded image")
    max_image_side: int = Field(
        2048,
        ge=8,
        le=16384,
        description="width and height of an uploaded image, read from its header before decoding",
    )
    max_image_pixels: int = Field(
        2048 * 2048,
        ge=64,
        le=16384 * 16384,
        description="width x height of an uploaded image, from its header: the decompression-bomb bound",
    )
    max_json_depth: int = Field(32, ge=2, le=1000, description="nesting of arrays/objects in a request body")
    body_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="a request body must arrive within this (408 otherwise): slow senders cannot hold slots",
    )
    max_form_parts: int = Field(
        16, ge=2, le=1000, description="parts of a multipart/form-data body (the image and its fields)"
    )
    max_form_field_bytes: int = Field(
        64 * 1024, ge=1024, le=16 * 1024 * 1024, description="one text field of a form body"
    )
    max_body_readers: int = Field(
        64,
        ge=1,
        le=100_000,
        description="request bodies read at once per replica; more get 503 at once, "
        "so slow senders never fill max_ongoing_requests",
    )

    @model_validator(mode="after")
    def _order(self) -> Limits:
        if self.min_nfe > self.max_nfe:
            raise ValueError(f"min_nfe {self.min_nfe} > max_nfe {self.max_nfe}")
        return self

    @property
    def max_body_bytes(self) -> int:
        """A request body may carry one base64 image plus a little JSON."""
        return self.max_image_bytes * 4 // 3 + 64 * 1024


class Batching(_Strict):
    max_batch_images: int = Field(
        16,
        ge=1,
        le=1024,
        description="images per compute turn (1 turns batching off); a request with more images runs alone",
    )
    batch_wait_timeout_s: float = Field(
        0.002,
        ge=0.0,
        le=10.0,
        description="how long a turn waits for requests still being read and validated (never when none are)",
    )
    row_stable: bool | int = Field(
        True,
        description="pad model calls to batch sizes whose rows are bit-identical to any other batch "
        "size (checked once per model at load), so an image never depends on its batch "
        "mates; false: no padding; an int: pad every call to at least that many rows",
    )


class ServeAppConfig(_Strict):
    models: list[ModelEntry] = Field(min_length=1)
    default_model: str | None = Field(
        None, description="model id used when a request names none (default: the first)"
    )
    limits: Limits = Field(default_factory=Limits)
    batching: Batching = Field(default_factory=Batching)
    text_cache_size: int = Field(
        4096, ge=0, description="prompts whose text embeddings stay cached per replica"
    )
    max_models_per_replica: int = Field(4, ge=1, description="@serve.multiplexed LRU size")
    threads: int = Field(1, ge=1, description="torch intra-op threads per replica")
    switch_interval_ms: float = Field(
        0.5,
        gt=0.0,
        le=100.0,
        description="the replica's sys.setswitchinterval: how long the torch thread may "
        "hold the GIL before the request-taking event loop gets a turn",
    )
    auth_token_env: str | None = Field(
        DEFAULT_TOKEN_ENV,
        description="environment variable holding a bearer token; unset or empty: no auth, "
        "which only a loopback bind or `auth: none` allows",
    )
    auth: Literal["token", "none"] | None = Field(
        None,
        description="token: a token is required; none: serve without one even off loopback (logged); "
        "default: a token when the variable is set, and a non-loopback bind refuses to start without one",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header names a request may use ('*': any); default: localhost, 127.0.0.1 "
        "and ::1 on a loopback bind (DNS rebinding), any otherwise",
    )
    show_model_paths: bool = Field(
        False, description="admin option: /v1/models also shows each model's path (source)"
    )
    cache_dir: str | None = Field(
        None, description="where s3:// checkpoints are downloaded (default ~/.cache/twinflow/exports)"
    )
    playground: bool = True

    @model_validator(mode="after")
    def _check(self) -> ServeAppConfig:
        ids = [m.id for m in self.models]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate model ids {dup}")
        if self.default_model is not None and self.default_model not in ids:
            raise ValueError(f"default_model {self.default_model!r} is not one of the model ids {ids}")
        return self

    @property
    def default_id(self) -> str:
        return self.default_model or self.models[0].id

    def resolved(self, base: str | os.PathLike | None = None) -> ServeAppConfig:
        """A copy with relative local model paths made absolute (against `base`, default the cwd):
        replicas may run in another directory."""
        root = Path(base) if base is not None else Path.cwd()
        models = []
        for m in self.models:
            p = m.path
            if not storage.is_s3(p):
                p = p[len("file://") :] if p.startswith("file://") else p
                p = str((root / Path(p).expanduser()).resolve())
            models.append(m.model_copy(update={"path": p}))
        return self.model_copy(update={"models": models})


def parse_args(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    if isinstance(args, ServeAppConfig):
        return args
    return ServeAppConfig.model_validate(dict(args or {}))
