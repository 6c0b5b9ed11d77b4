"""A `TwinFlow` replica object in this process, without Ray or a model: its routes are called with real
Starlette requests and its batcher answers with fake PNGs that spell out the queued item, so a test
sees exactly what each route queued and how it answered, in milliseconds."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from twinflow.serve import app as app_module
from twinflow.serve.engine import Result
from twinflow.serve.schemas import ApiError

from .helpers import app_args

HOST = "127.0.0.1:8000"


def model_info(mid: str, tasks: list[str], guidance: float = 0.0) -> dict[str, Any]:
    return {
        "id": mid,
        "default": mid == "tiny",
        "method": "flow_matching",
        "guidance": guidance,
        "job": "replica-test",
        "steps": 1,
        "family": "qwen_image",
        "sample_shape": [1, 28, 28],
        "image_size": 28,
        "channels": 1,
        "latent": False,
        "lora": False,
        "tasks": tasks,
        "nfe": {"min": 1, "max": 8, "default": 1},
        "text_max_length": 16,
    }


def make_replica(token: str | None = None, **limits: Any):
    """The deployment's own __init__ on two models ('tiny' generates, 'tiny-edit' also edits); the
    process-wide settings it changes (torch threads, GIL switch interval, Pillow's pixel bound) are
    put back."""
    cls = app_module.TwinFlow.func_or_class.__bases__[0]  # ours, under Serve's ingress wrapper
    config = app_args(
        {"tiny": Path("/unused/tiny"), "tiny-edit": Path("/unused/tiny-edit")},
        auth="token" if token else None,
    )
    config["limits"].update(limits)
    infos = [model_info("tiny", ["generate"]), model_info("tiny-edit", ["generate", "edit"])]
    saved = torch.get_num_threads(), sys.getswitchinterval(), Image.MAX_IMAGE_PIXELS
    rep = cls.__new__(cls)
    try:
        rep.__init__(config, infos, token)
    finally:
        torch.set_num_threads(saved[0])
        sys.setswitchinterval(saved[1])
        Image.MAX_IMAGE_PIXELS = saved[2]
    rep.queued = []

    async def submit(item):
        rep.queued.append(item)
        ref = "-" if item.image is None else hashlib.sha256(item.image.tobytes()).hexdigest()[:16]
        shape = "-" if item.image is None else "x".join(map(str, item.image.shape))
        pngs = [
            f"{item.model_id}|{item.prompt}|{item.nfe}|{item.seed}|{item.guidance}|{i}|{shape}|{ref}".encode()
            for i in range(item.num_images)
        ]
        return Result(pngs, 1.5, ready_at=time.perf_counter())

    rep.batcher.submit = submit
    return rep


def request(
    path: str, body: bytes, content_type: str | None, headers: dict[str, str] | None = None
) -> Request:
    """A POST as Serve's proxy hands it to the replica; the body arrives in 1000-byte chunks."""
    named = {"host": HOST, "content-length": str(len(body))}
    if content_type is not None:
        named["content-type"] = content_type
    named.update({k.lower(): v for k, v in (headers or {}).items()})
    raw = [(k.encode(), v.encode()) for k, v in named.items()]
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)] or [b""]

    async def receive():
        chunk = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 1234),
    }
    return Request(scope, receive)


ROUTES = {
    "/v1/generate": "generate",
    "/v1/edit": "edit",
    "/v1/images/generations": "images_generations",
    "/v1/images/edits": "images_edits",
}


def call(
    rep, path: str, body: bytes, content_type: str | None, headers: dict[str, str] | None = None
) -> Response:
    """The route's answer; an ApiError it raises is answered as the app's handler answers it."""

    async def go() -> Response:
        try:
            return await getattr(rep, ROUTES[path])(request(path, body, content_type, headers))
        except ApiError as exc:
            return Response(
                json.dumps(exc.body()),
                status_code=exc.status,
                headers=exc.headers,
                media_type="application/json",
            )

    return asyncio.run(go())


def post_json(rep, path: str, data: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return call(rep, path, json.dumps(data).encode(), "application/json", headers)


def form(
    fields: dict[str, str], files: dict[str, tuple[str, bytes]], boundary: str = "b0undary"
) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type."""
    out = b""
    for k, v in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
    for k, (name, data) in files.items():
        out += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
