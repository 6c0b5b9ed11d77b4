"""Reading a request body safely: size, time and nesting bounds, strict JSON, always a JSON error.

A client sending one byte at a time held a replica slot for as long as it liked (600 of them starved
`/healthz`), and 100k nested brackets raised RecursionError inside json.loads (a plain-text 500).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Callable

from twinflow.serve.schemas import ApiError


def nesting_depth(raw: bytes) -> int:
    """Deepest nesting of JSON arrays/objects in `raw`, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    """Strict JSON object, or ApiError 400 naming what is wrong. Base64 images hold no brackets,
    so the byte-by-byte depth scan only runs on bodies with many of them."""
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_depth(raw) > max_depth:
        raise ApiError(400, "malformed_json", f"request body nests deeper than {max_depth} levels")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "request body nests too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "request body must be a JSON object")
    return data


class BodyReaders:
    """Bounds one replica's concurrent body reads and how long each may take."""

    def __init__(self, max_readers: int, timeout_s: float, max_bytes: int) -> None:
        self.max_readers, self.timeout_s, self.max_bytes = max_readers, timeout_s, max_bytes
        self.active = 0

    async def read(
        self,
        stream: AsyncIterator[bytes],
        content_length: str | None,
        sink: Callable[[bytes], Awaitable[None]] | None = None,
    ) -> bytes:
        """The body under the size, time and reader bounds; with `sink`, each chunk goes to it as it
        arrives (a streaming parser) and nothing is kept."""
        if content_length is not None and content_length.isdigit() and int(content_length) > self.max_bytes:
            raise ApiError(413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes")
        if self.active >= self.max_readers:
            raise ApiError(
                503,
                "busy",
                f"{self.max_readers} request bodies are being received; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        try:
            return await asyncio.wait_for(self._collect(stream, sink), self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                408, "request_timeout", f"the request body did not arrive within {self.timeout_s:g} s"
            ) from None
        finally:
            self.active -= 1

    async def _collect(self, stream: AsyncIterator[bytes], sink) -> bytes:
        buf = bytearray()
        size = 0
        async for chunk in stream:  # read no further than the limit, whatever the headers say
            size += len(chunk)
            if size > self.max_bytes:
                raise ApiError(
                    413, "payload_too_large", f"request body is larger than {self.max_bytes} bytes"
                )
            if sink is None:
                buf += chunk
            elif chunk:
                await sink(chunk)
        return bytes(buf)
