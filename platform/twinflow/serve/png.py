"""PNG bytes for a whole batch at once, byte-identical to Pillow's `Image.save(format="PNG")`.

Why: at 1 NFE a batch of 16 small images spent more time in Pillow's per-image save machinery than
in zlib. Here the row filters of every image are chosen in one numpy pass with Pillow's own
rule (per row, the least sum of |filtered byte| as signed bytes among none, up, sub and paeth, ties to
the earlier), and each image is deflated with Pillow's settings (default level, Z_FILTERED, window 15,
memLevel 9), so the bytes are the ones Pillow writes: 8-bit gray or RGB, one IDAT chunk.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _cost(f: np.ndarray) -> np.ndarray:
    """Sum over each row of |byte| read as a signed byte (Pillow's and libpng's filter heuristic)."""
    f = f.astype(np.int32)
    return np.where(f < 128, f, 256 - f).sum(axis=-1)


def _filtered_rows(img: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, H, 1 + W*C) uint8: each row with its filter byte, Pillow's choice."""
    n, h, w, c = img.shape
    x = img.reshape(n, h, w * c).astype(np.int16)
    up_row = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)  # the row above (black at top)
    left = np.concatenate([np.zeros_like(x[..., :c]), x[..., :-c]], axis=2)
    up_left = np.concatenate([np.zeros_like(up_row[..., :c]), up_row[..., :-c]], axis=2)
    pa, pb, pc = np.abs(up_row - up_left), np.abs(left - up_left), np.abs(left + up_row - 2 * up_left)
    pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up_row, up_left))
    cands = np.stack([x, x - up_row, x - left, x - pred]).astype(np.uint8)  # none, up, sub, paeth
    choice = np.argmin(np.stack([_cost(f) for f in cands]), axis=0)  # first minimum: Pillow's order
    rows = np.take_along_axis(cands, choice[None, ..., None], axis=0)[0]
    kind = np.array([0, 2, 1, 4], np.uint8)[choice]
    return np.concatenate([kind[..., None], rows], axis=-1)


def encode_pngs(img: np.ndarray) -> list[bytes]:
    """(N, H, W, C) uint8 with C 1 (gray) or 3 (RGB) -> one PNG per image."""
    if img.ndim != 4 or img.shape[-1] not in (1, 3) or img.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 1 or 3) uint8, got {img.shape} {img.dtype}")
    n, h, w, c = img.shape
    header = _SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    out = []
    for rows in _filtered_rows(img):
        z = zlib.compressobj(-1, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
        out.append(header + _chunk(b"IDAT", z.compress(rows.tobytes()) + z.flush()) + _IEND)
    return out
