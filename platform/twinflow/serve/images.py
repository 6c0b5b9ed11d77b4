"""Uploaded images for `/v1/edit`: checked before anything is decoded, then decoded once.

Order matters: the byte size is checked on the (base64) text and on the raw bytes, the format from the
file's magic bytes, and width, height and pixel count from the header (PIL's `Image.open` reads only
the header); pixels are decoded only after all of that passed. A 100 kB PNG declaring 50000 x 50000
pixels (a decompression bomb) is refused as 413 before a byte of it is inflated.

Multipart bodies (`curl -F image=@digit.png -F instruction=...`) are parsed by `serve.uploads` as they
stream in; the app runs the decoding here on its upload threads, never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from twinflow.serve.uploads import FormLimits, StreamingForm

FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ImageBounds:
    max_bytes: int
    max_side: int
    max_pixels: int


def sniff_format(raw: bytes) -> str | None:
    """PNG, JPEG or WEBP from the magic bytes; None for anything else."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if raw.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(raw) >= 12 and raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return None


def base64_bytes(text: str, max_bytes: int) -> bytes:
    """base64 text (or a data: URL) -> bytes; the length is checked before decoding."""
    text = text.strip()
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ValueError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise OverflowError(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None


def open_image(raw: bytes, bounds: ImageBounds):
    """Validated, decoded PIL image. ValueError: not an allowed, decodable image (400);
    OverflowError: too many bytes or pixels (413)."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise ValueError("image is empty")
    if len(raw) > bounds.max_bytes:
        raise OverflowError(f"image is {len(raw)} bytes, the limit is {bounds.max_bytes}")
    fmt = sniff_format(raw)
    if fmt is None:
        raise ValueError(f"image is not one of {', '.join(FORMATS)} (checked by its first bytes)")
    try:
        img = Image.open(io.BytesIO(raw), formats=[fmt])  # reads the header only
        w, h = img.size
    except Image.DecompressionBombError as exc:  # PIL's own header check (when MAX_IMAGE_PIXELS is set)
        raise OverflowError(f"image header declares too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"image header could not be read: {type(exc).__name__}") from None
    if w > bounds.max_side or h > bounds.max_side or w * h > bounds.max_pixels:
        raise OverflowError(
            f"image is {w}x{h} ({w * h} pixels); the limits are {bounds.max_side} per side and "
            f"{bounds.max_pixels} pixels"
        )
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image could not be decoded: {type(exc).__name__}") from None
    return img


def decode_image(data: str, bounds: ImageBounds):
    """base64 (or data: URL) -> decoded PIL image, with `open_image`'s checks."""
    return open_image(base64_bytes(data, bounds.max_bytes), bounds)


def parse_multipart(
    raw: bytes, content_type: str, limits: FormLimits = FormLimits()
) -> tuple[dict[str, str], dict[str, bytes]]:
    """A whole multipart/form-data body -> (text fields, file fields). ValueError names what is wrong;
    its subclass uploads.FormTooLarge: over one of `limits`."""
    form = StreamingForm(content_type, limits)
    form.feed(raw)
    return form.result()


FORM_INTS = ("nfe", "seed", "num_images")
FORM_FLOATS = ("guidance",)


def form_values(fields: dict[str, str]) -> tuple[dict[str, object], list[dict[str, object]]]:
    """Form text -> the JSON request's types (numbers for nfe, seed, num_images, guidance), and the
    problems as the API's 422 details ({loc, msg, input})."""
    out: dict[str, object] = {}
    problems: list[dict[str, object]] = []
    for k, v in fields.items():
        try:
            out[k] = int(v) if k in FORM_INTS else float(v) if k in FORM_FLOATS else v
        except ValueError:
            kind = "a whole number" if k in FORM_INTS else "a number"
            problems.append({"loc": [k], "msg": f"must be {kind}", "input": v})
    return out, problems
