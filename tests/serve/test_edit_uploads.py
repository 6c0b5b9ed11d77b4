"""Uploaded edit images are checked before decoding (format, bytes, header pixels), multipart bodies parse
with the streaming parser (serve.uploads), and whatever slips through the routes still answers the JSON
error model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json

import pytest
from PIL import Image

from twinflow.serve.images import (
    ImageBounds,
    base64_bytes,
    decode_image,
    form_values,
    open_image,
    parse_multipart,
    sniff_format,
)

BOUNDS = ImageBounds(max_bytes=64 * 1024, max_side=256, max_pixels=128 * 128)


def encoded(size=(28, 28), fmt="PNG", mode="L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 77).save(buf, format=fmt)
    return buf.getvalue()


def test_allowed_formats_decode_and_others_are_refused_by_their_bytes():
    for fmt, mode in (("PNG", "L"), ("JPEG", "RGB"), ("WEBP", "RGB")):
        raw = encoded(fmt=fmt, mode=mode)
        assert sniff_format(raw) == fmt and open_image(raw, BOUNDS).size == (28, 28)
    for fmt in ("GIF", "BMP", "TIFF"):
        with pytest.raises(ValueError, match="not one of PNG, JPEG, WEBP"):
            open_image(encoded(fmt=fmt), BOUNDS)
    with pytest.raises(ValueError, match="empty"):
        open_image(b"", BOUNDS)
    with pytest.raises(ValueError, match="header"):  # right magic, broken header
        open_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, BOUNDS)
    truncated = encoded((64, 64))[:60]
    with pytest.raises(ValueError):
        open_image(truncated, BOUNDS)


def test_a_decompression_bomb_is_refused_from_its_header():
    """50000 x 50000 pixels in ~2.4 MB of PNG: refused by the header (413) before any pixel is inflated,
    with Pillow's own bomb limit off (as in the app) and on."""
    bomb = encoded((50000, 50000))
    before = Image.MAX_IMAGE_PIXELS
    try:
        for limit in (None, before):
            Image.MAX_IMAGE_PIXELS = limit
            with pytest.raises(OverflowError):
                open_image(bomb, ImageBounds(len(bomb) + 1, 60000, 128 * 128))
    finally:
        Image.MAX_IMAGE_PIXELS = before
    with pytest.raises(OverflowError, match="pixels"):  # sides within bounds, pixel count not
        open_image(encoded((200, 200)), BOUNDS)
    with pytest.raises(OverflowError, match="300x8"):
        open_image(encoded((300, 8)), BOUNDS)
    with pytest.raises(OverflowError, match="bytes"):
        open_image(b"\x89PNG\r\n\x1a\n" + b"\0" * BOUNDS.max_bytes, BOUNDS)


def test_base64_and_data_urls():
    raw = encoded()
    text = base64.b64encode(raw).decode()
    assert base64_bytes(text, 10_000) == raw == base64_bytes("data:image/png;base64," + text, 10_000)
    assert decode_image(text, BOUNDS).size == (28, 28)
    with pytest.raises(ValueError, match="base64"):
        base64_bytes("@@@", 10_000)
    with pytest.raises(ValueError, match="data: URL"):
        base64_bytes("data:image/png," + text, 10_000)
    with pytest.raises(OverflowError):
        base64_bytes("A" * 20_000, 10_000)


def test_multipart_bodies_and_form_values():
    png = encoded() + b"\r\n--not-the-boundary\r\n"  # binary content with CRLFs survives
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="instruction"\r\n\r\nflip it \u2194\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="nfe"\r\n\r\n2\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    fields, files = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert fields == {"instruction": "flip it \u2194", "nfe": "2"} and files == {"image": png}
    assert form_values({"nfe": "2", "seed": "7", "guidance": "0.5", "instruction": "x"}) == (
        {"nfe": 2, "seed": 7, "guidance": 0.5, "instruction": "x"},
        [],
    )
    assert form_values({"nfe": "two"})[1] == [
        {"loc": ["nfe"], "msg": "must be a whole number", "input": "two"}
    ]
    with pytest.raises(ValueError, match="boundary"):
        parse_multipart(body, "multipart/form-data")
    twice = body.replace(b'name="nfe"', b'name="instruction"')
    with pytest.raises(ValueError, match="twice"):
        parse_multipart(twice, f"multipart/form-data; boundary={boundary}")


async def _asgi_get(app, path: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "server": ("test", 80),
        "client": ("test", 1),
    }
    with contextlib.suppress(RuntimeError):  # Starlette re-raises after the handler has answered
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_an_unexpected_exception_answers_the_json_error_model():
    """The app's catch-all: a route that raises something unplanned gives a JSON 500 without the
    exception's text, never Starlette's plain-text 'Internal Server Error'."""
    from twinflow.serve.app import api

    async def boom():
        raise RuntimeError("internal detail that must not leak")

    api.add_api_route("/__test_boom", boom)
    try:
        status, body = asyncio.run(_asgi_get(api, "/__test_boom"))
    finally:
        api.router.routes = [r for r in api.router.routes if getattr(r, "path", "") != "/__test_boom"]
    assert status == 500
    assert json.loads(body) == {
        "error": {"type": "internal_error", "message": "RuntimeError while handling the request"}
    }
