"""Tensors in [-1, 1] to images: PNG bytes for Serve, labelled sample grids for training and eval."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8; C is 1 (gray) or 3 (RGB)."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).numpy()


def to_pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0], mode="L") if img.shape[-1] == 1 else Image.fromarray(img, mode="RGB")


def png_bytes(x: torch.Tensor) -> list[bytes]:
    out = []
    for img in to_uint8(x):
        buf = io.BytesIO()
        to_pil(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def save_grid(
    rows: Sequence[torch.Tensor],
    labels: Sequence[str],
    path: str | Path,
    scale: int = 2,
    label_width: int | None = None,
) -> Path:
    """One row per tensor (N, C, H, W), each with a text label on the left (e.g. '1 NFE'). The label
    column is as wide as the widest label's rendered text (Pillow's `textbbox`), so none is cut off."""
    if len(rows) != len(labels):
        raise ValueError("one label per row")
    imgs = [to_uint8(r) for r in rows]
    h, w = imgs[0].shape[1] * scale, imgs[0].shape[2] * scale
    ncol = max(len(r) for r in imgs)
    pad = 2
    if label_width is None:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = 4 + max((measure.textbbox((0, 0), t)[2] for t in labels), default=0) + 8
    canvas = Image.new("RGB", (label_width + ncol * (w + pad), len(imgs) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(imgs, labels)):
        y = i * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        for j, img in enumerate(row):
            tile = to_pil(img).convert("RGB").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_width + j * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
