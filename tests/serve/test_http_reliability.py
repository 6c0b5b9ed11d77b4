"""Issue 15 over HTTP: bad requests fail alone and as JSON (defects 5, 6, the 413 and model-id items)
and slow request bodies cannot stall the service (defect 7)."""

from __future__ import annotations

import base64
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import requests

pytestmark = pytest.mark.integration
TOKEN = {"Authorization": "Bearer s3cret-token"}


def raw_post(base: str, path: str, raw: bytes, headers=None):
    return requests.post(
        base + path, data=raw, headers={"Content-Type": "application/json", **(headers or {})}, timeout=60
    )


def assert_json_error(r, status: int, kind: str | None = None):
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    err = r.json()["error"]
    assert err["message"] and (kind is None or err["type"] == kind), err


def test_a_lone_surrogate_fails_alone_among_concurrent_requests(serve_app):
    bad = b'{"prompt": "a\\ud800b", "seed": 1}'
    good = [f'{{"prompt": "a photo of a bag", "seed": {i}}}'.encode() for i in range(12)]
    with ThreadPoolExecutor(13) as pool:
        futs = [pool.submit(raw_post, serve_app, "/v1/generate", b) for b in [bad] + good]
        results = [f.result() for f in futs]
    assert_json_error(results[0], 422, "invalid_request")
    assert [r.status_code for r in results[1:]] == [200] * 12


@pytest.mark.parametrize(
    "raw,status",
    [
        (b'{"prompt": "a", "guidance": 1e309}', 422),
        (b'{"prompt": "a", "guidance": Infinity}', 400),
        (b'{"prompt": "a", "guidance": NaN}', 400),
        (b"[" * 60_000 + b"]" * 60_000, 400),  # under the body limit, far over the depth limit
        (b'{"prompt": "a", "model": ""}', 422),
    ],
)
def test_every_error_is_the_json_model(serve_app, raw, status):
    assert_json_error(raw_post(serve_app, "/v1/generate", raw), status)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims width x height (the pixels are never there)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_huge_image_header_is_413(serve_app):
    body = {
        "model": "tiny-edit",
        "image": base64.b64encode(png_header(20000, 20000)).decode(),
        "instruction": "x",
    }
    r = requests.post(serve_app + "/v1/edit", json=body, timeout=60)
    assert_json_error(r, 413, "image_too_large")


def _slow_client(base: str, path: str, headers: dict[str, str]) -> socket.socket:
    """A connection that sends its headers and one byte of a 1000-byte body, then nothing."""
    url = urlparse(base)
    s = socket.create_connection((url.hostname, url.port), timeout=30)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
        f"Content-Length: 1000\r\n{head}\r\n{{".encode()
    )
    return s


def _status(s: socket.socket) -> int | None:
    try:
        line = s.recv(64).split(b"\r\n", 1)[0]
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except (OSError, ValueError, IndexError):
        return None


def test_slow_bodies_cannot_stall_the_service(serve_app):
    """300 authenticated-looking slow senders (more than max_ongoing_requests=256) on the open app and
    100 unauthenticated ones on the secured app: /healthz and generation still answer, the slow ones get
    503 (over the reader cap) or 408 (body timeout, 3 s here) and 401 (no token) instead of waiting."""
    slow = [_slow_client(serve_app, "/v1/generate", {}) for _ in range(300)]
    unauth = [_slow_client(serve_app, "/secure/v1/generate", {}) for _ in range(100)]
    try:
        time.sleep(1.0)
        t0 = time.perf_counter()
        h = requests.get(serve_app + "/healthz", timeout=10)
        assert h.status_code == 200 and time.perf_counter() - t0 < 5
        # While the slow senders hold every body-reader slot, a new request is answered at once (503 with
        # Retry-After), never queued behind them; once their bodies time out (3 s) it is served.
        t1 = time.perf_counter()
        g = requests.post(serve_app + "/v1/generate", json={"prompt": "still here", "seed": 3}, timeout=30)
        assert g.status_code in (200, 503) and time.perf_counter() - t1 < 10
        retry_until = time.time() + 20
        while g.status_code == 503 and time.time() < retry_until:
            assert "retry-after" in {k.lower() for k in g.headers}
            time.sleep(1.0)
            g = requests.post(
                serve_app + "/v1/generate", json={"prompt": "still here", "seed": 3}, timeout=30
            )
        assert g.status_code == 200
        deadline = time.time() + 15
        for s in slow + unauth:
            s.settimeout(max(0.1, deadline - time.time()))
        codes = [_status(s) for s in slow]
        assert set(codes) <= {408, 503}, sorted(set(map(str, codes)))
        assert codes.count(503) >= 300 - 32 - 1 and codes.count(408) >= 1
        assert {_status(s) for s in unauth} == {401}
    finally:
        for s in slow + unauth:
            s.close()
