"""multipart/form-data bodies for `/v1/edit`, parsed as they arrive with python-multipart's streaming
parser (the one Starlette uses) under caps on parts, headers and sizes.

The stdlib e-mail parser this replaced read the whole body first and its cost grew faster than
linearly with the number of parts: 40,000 one-byte parts (2.3 MB) held the event loop for 15 s. Here
every part, header and byte is counted while it streams in, so a hostile body is refused at the
first part over a cap, after reading no more than one chunk past it.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header


@dataclass(frozen=True)
class FormLimits:
    max_parts: int = 16
    max_field_bytes: int = 64 * 1024  # one text field
    max_file_bytes: int = 4 * 1024 * 1024  # one file part
    max_headers: int = 8  # per part
    max_header_bytes: int = 1024  # one header line


class FormTooLarge(ValueError):
    """Over a cap: answered 413 where it is caught first, and a malformed form (400) by a caller that
    only knows ValueError."""


class StreamingForm:
    """Feed the body's chunks to `feed`, then `result()` gives (text fields, file fields).

    ValueError: malformed form (400); FormTooLarge: over a cap (413)."""

    def __init__(self, content_type: str, limits: FormLimits) -> None:
        media, params = parse_options_header(content_type)
        if media.lower() != b"multipart/form-data":
            raise ValueError("the body is not multipart/form-data")
        boundary = params.get(b"boundary")
        if not boundary:
            raise ValueError("multipart/form-data without a boundary")
        self.limits = limits
        self.fields: dict[str, str] = {}
        self.files: dict[str, bytes] = {}
        self.parts = 0
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._name: str | None = None
        self._filename: bytes | None = None
        self._data = bytearray()
        self._cap = 0
        try:
            self.parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._part_begin,
                    "on_header_field": self._header_field,
                    "on_header_value": self._header_value,
                    "on_header_end": self._header_end,
                    "on_headers_finished": self._headers_finished,
                    "on_part_data": self._part_data,
                    "on_part_end": self._part_end,
                    "on_end": self._end,
                },
                max_header_count=limits.max_headers,
                max_header_size=limits.max_header_bytes,
            )
        except FormParserError as exc:
            raise ValueError(str(exc)) from None

    def feed(self, chunk: bytes) -> None:
        if self.ended:
            return  # the epilogue after the closing boundary is ignored, as RFC 2046 says
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise ValueError(str(exc)) from None

    def result(self) -> tuple[dict[str, str], dict[str, bytes]]:
        if not self.ended:
            raise ValueError("the body ends before the closing boundary")
        return self.fields, self.files

    # ------------------------------------------------------------ parser callbacks
    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_parts:
            raise FormTooLarge(f"more than {self.limits.max_parts} form parts")
        self._headers, self._data = {}, bytearray()
        self._field = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.strip().lower()] = self._value.strip()
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition"))
        name = params.get(b"name")
        if disposition.lower() != b"form-data" or not name:
            raise ValueError("a form part has no name (Content-Disposition: form-data; name=...)")
        try:
            self._name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("a form part's name is not UTF-8") from None
        if self._name in self.fields or self._name in self.files:
            raise ValueError(f"form field {self._name!r} is given twice")
        self._filename = params.get(b"filename")
        is_file = self._filename is not None
        self._cap = self.limits.max_file_bytes if is_file else self.limits.max_field_bytes

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if len(self._data) + (end - start) > self._cap:
            kind = "file part" if self._filename is not None else "field"
            raise FormTooLarge(f"form {kind} {self._name!r} is larger than {self._cap} bytes")
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._name is None:
            raise ValueError("a form part has no headers")
        if self._filename is not None:
            self.files[self._name] = bytes(self._data)
        else:
            try:
                self.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"form field {self._name!r} is not UTF-8 text") from None
        self._name = None

    def _end(self) -> None:
        self.ended = True
