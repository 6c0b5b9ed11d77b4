"""Prometheus metrics of the Serve app, exported through Ray's metrics agent (`ray.util.metrics`).

They appear on every node's metrics endpoint (`http://<node>:<metrics export port>/metrics`, the port
`ray start --metrics-export-port` sets) beside Serve's own `ray_serve_*` metrics, each name prefixed
`ray_` by Ray:

- `twinflow_requests_total{route, model, nfe, status}`: answered requests, errors included;
- `twinflow_request_latency_ms{route, model, nfe}`: route entered to response sent;
- `twinflow_queue_wait_ms`, `twinflow_model_ms`, `twinflow_encoding_ms{model, nfe}`: per request, the
  wait for a compute turn, and the sampling and PNG encoding of the turn that served it;
- `twinflow_batch_requests`, `twinflow_batch_images{model, nfe}`: per compute turn and model/NFE in it,
  its requests and images.

`model` and `nfe` are set once a request named a known model (an out-of-range NFE keeps its value, e.g.
a 422 for nfe 99); they are empty on requests refused before that (auth, body, schema, unknown model).
The metric objects are made on first use in the process that records them (a Serve replica).
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any, Iterable

ROUTES = (
    "/v1/generate",
    "/v1/edit",
    "/v1/images/generations",
    "/v1/images/edits",
)
LATENCY_MS = [1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]

# The labels a route learns while handling a request (model, nfe), read back by the middleware.
_LABELS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "twinflow_metric_labels", default=None
)


class _Metrics:
    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        per_request = ("model", "nfe")
        self.requests = Counter(
            "twinflow_requests",
            description="answered requests by route, model, NFE and HTTP status",
            tag_keys=("route", "model", "nfe", "status"),
        )
        self.latency = Histogram(
            "twinflow_request_latency_ms",
            description="route entered to response sent, ms",
            boundaries=LATENCY_MS,
            tag_keys=("route", *per_request),
        )
        self.phases = {
            name: Histogram(
                f"twinflow_{name}_ms", description=text, boundaries=LATENCY_MS, tag_keys=per_request
            )
            for name, text in (
                ("queue_wait", "request queued to taken into a compute turn, ms"),
                ("model", "sampling time of the compute turn that served the request, ms"),
                ("encoding", "PNG encoding time of the compute turn that served the request, ms"),
            )
        }
        self.batch_requests = Histogram(
            "twinflow_batch_requests",
            description="requests per compute turn, per model and NFE in it",
            boundaries=BATCH_SIZES,
            tag_keys=per_request,
        )
        self.batch_images = Histogram(
            "twinflow_batch_images",
            description="images per compute turn, per model and NFE in it",
            boundaries=BATCH_SIZES,
            tag_keys=per_request,
        )


_metrics: _Metrics | None = None
log = logging.getLogger(__name__)
_failed = False


def _never_raises(fn):
    """Metrics must never fail a request: the first failure is logged, later ones are dropped."""

    def guarded(*args, **kwargs) -> None:
        global _failed
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            if not _failed:
                _failed = True
                log.warning("twinflow metrics could not be recorded: %s: %s", type(exc).__name__, exc)

    return guarded


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def label_request(model: str, nfe: int) -> None:
    """Called by a route once the request's model and NFE are known."""
    labels = _LABELS.get()
    if labels is not None:
        labels.update(model=model, nfe=str(nfe))


@_never_raises
def record_turn(items: Iterable[Any], phases: dict[str, float], started: float) -> None:
    """One compute turn: each request's queue wait and the turn's model and encoding times, with the
    request's labels; the turn's requests and images per model and NFE (each such group is sampled
    together, as one batch of noise, when its guidance and task agree)."""
    m = _get()
    items = list(items)
    for it in items:
        tags = {"model": it.model_id, "nfe": str(it.nfe)}
        m.phases["queue_wait"].observe(max(0.0, (started - it.queued_at) * 1e3), tags=tags)
        m.phases["model"].observe(phases.get("model", 0.0), tags=tags)
        m.phases["encoding"].observe(phases.get("encoding", 0.0), tags=tags)
    for model, nfe in dict.fromkeys((it.model_id, it.nfe) for it in items):
        mine = [it for it in items if it.model_id == model and it.nfe == nfe]
        tags = {"model": model, "nfe": str(nfe)}
        m.batch_requests.observe(len(mine), tags=tags)
        m.batch_images.observe(sum(it.num_images for it in mine), tags=tags)


class RequestMetrics:
    """ASGI middleware: counts every request to the sampling routes by status, with its latency."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        route = scope.get("path", "") if scope.get("type") == "http" else ""
        root = scope.get("root_path", "")
        if root and route.startswith(root):
            route = route[len(root) :]
        if route not in ROUTES:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        labels = {"model": "", "nfe": ""}
        token = _LABELS.set(labels)
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _LABELS.reset(token)
            _record_request(route, status["code"], labels, (time.perf_counter() - t0) * 1e3)


@_never_raises
def _record_request(route: str, status: int, labels: dict[str, str], ms: float) -> None:
    m = _get()
    m.requests.inc(1, tags={"route": route, "status": str(status), **labels})
    m.latency.observe(ms, tags={"route": route, **labels})
