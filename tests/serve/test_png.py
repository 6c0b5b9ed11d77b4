"""The batch PNG encoder writes exactly Pillow's bytes (so images, hashes and every earlier PNG stay the
same), for gray and RGB, flat, smooth, noisy and sharp-edged images, where Pillow picks every row filter."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from twinflow.imaging import png_bytes, to_uint8
from twinflow.serve.png import _filtered_rows, encode_pngs


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lin = torch.linspace(-1, 1, 28)
    smooth = (lin[None, None, :, None] * lin[None, None, None, :]).repeat(4, 1, 1, 1)
    smooth[2] = torch.sin(smooth[2] * 7)
    smooth[3] = (smooth[3] > 0).float() * 2 - 1
    return [
        torch.rand(16, 1, 28, 28, generator=g) * 2 - 1,  # noise
        torch.full((3, 1, 28, 28), -1.0),  # flat black
        smooth,
        torch.cat([smooth, smooth.flip(-1), smooth.transpose(-1, -2)], 1),  # RGB
        torch.rand(2, 3, 32, 48, generator=g) * 2 - 1,
        (torch.rand(8, 1, 28, 28, generator=g) > 0.7).float() * 2 - 1,  # sparse strokes
    ]


@pytest.mark.parametrize("i", range(6))
def test_bytes_equal_pillows(i):
    x = _images()[i]
    ours = encode_pngs(to_uint8(x))
    assert ours == png_bytes(x)
    for png, img in zip(ours, to_uint8(x)):
        arr = np.asarray(Image.open(io.BytesIO(png)))
        assert np.array_equal(arr.reshape(img.shape), img)


def test_every_filter_is_chosen_somewhere():
    kinds = set()
    for x in _images():
        kinds |= set(np.unique(_filtered_rows(to_uint8(x))[..., 0]).tolist())
    assert kinds == {0, 1, 2, 4}  # none, sub, up, paeth (Pillow tries average only with optimize)


def test_rejects_other_layouts():
    with pytest.raises(ValueError, match="uint8"):
        encode_pngs(np.zeros((1, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_pngs(np.zeros((4, 4, 1), np.uint8))
