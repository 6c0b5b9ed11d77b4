"""Image bytes <-> arrays: encode for shards, decode + resize/crop + normalise for training."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from twinflow.data.captions import stable_index


def encode_image(im: Image.Image, fmt: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpeg":
        im.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image_format {fmt!r}: expected png or jpeg")
    return buf.getvalue()


def square(im: Image.Image, size: int, crop: str = "center", key: str = "", seed: int = 0) -> Image.Image:
    """Resize the short side to ``size`` and crop a square (center, or seeded by ``key`` for random)."""
    w, h = im.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            # BOX averages when shrinking (no aliasing); BICUBIC when enlarging.
            im = im.resize((nw, nh), Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
        if (nw, nh) != (size, size):
            if crop == "random":
                x = stable_index(seed, f"{key}/x", nw - size + 1)
                y = stable_index(seed, f"{key}/y", nh - size + 1)
            else:
                x, y = (nw - size) // 2, (nh - size) // 2
            im = im.crop((x, y, x + size, y + size))
    return im


def decode_image(data: bytes, channels: int) -> Image.Image:
    """PNG/JPEG bytes -> PIL image with 1 (L) or 3 (RGB) channels; raises on undecodable bytes."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            bg.alpha_composite(rgba)
            im = bg
        return im.convert("L" if channels == 1 else "RGB")


def to_chw(im: Image.Image) -> np.ndarray:
    """PIL image -> float32 (C, H, W) in [-1, 1]."""
    arr = np.asarray(im, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return arr / 127.5 - 1.0


def load_chw(
    data: bytes, size: int, channels: int, crop: str = "center", key: str = "", seed: int = 0
) -> np.ndarray:
    return to_chw(square(decode_image(data, channels), size, crop, key, seed))
