"""Labelled sample grids (`twinflow.imaging.save_grid`): the demo's, training's and sweeps' grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from twinflow.imaging import save_grid

# the demo's widest row label (`twinflow.demo.comparison_grid`: the base with its CFG scale)
LABELS = ["base 50 NFE (CFG 4)", "base 1 NFE (CFG 4)", "twinflow 1 NFE", "twinflow 2 NFE"]


def _ink(img: Image.Image) -> int:
    return int((np.asarray(img.convert("L")) < 128).sum())


def test_grid_labels_are_never_cut(tmp_path):
    """White tiles pasted after the text would hide any part of a label that ran into the image
    columns: each row's ink must equal its label rendered alone on a wide canvas."""
    rows = [torch.ones(5, 1, 28, 28) for _ in LABELS]  # all-white images
    grid = Image.open(save_grid(rows, LABELS, tmp_path / "grid.png"))
    h = 28 * 2 + 2
    for i, label in enumerate(LABELS):
        alone = Image.new("RGB", (400, h), "white")
        ImageDraw.Draw(alone).text((4, 28 - 6), label, fill="black")
        row = grid.crop((0, i * h, grid.width, (i + 1) * h))
        assert _ink(row) == _ink(alone) > 0, label
    # the label column fits the widest label, not much more: 5 tiles of 56 px + 2 px padding beside it
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), t)[2] for t in LABELS)
    assert widest + 4 <= grid.width - 5 * 58 <= widest + 16
