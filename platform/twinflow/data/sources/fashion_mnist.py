"""Fashion-MNIST from its IDX files (Debian package `dataset-fashion-mnist`), captioned by class."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from twinflow.data.captions import check_templates, fill
from twinflow.data.config import FashionMnistSource as FashionMnistConfig
from twinflow.data.sources.base import Source, SourceItem

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Nouns that read well inside a sentence ("a photo of a pair of trousers").
NOUNS = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SETUP_HINT = "install it with scripts/setup.sh (apt package dataset-fashion-mnist)"


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (uint8 images or labels)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">i", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x})")
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({arr.size} values for shape {shape})")
    return arr.reshape(shape)


class FashionMnist(Source):
    mode = "L"

    def __init__(self, cfg: FashionMnistConfig, seed: int) -> None:
        check_templates(cfg.captions, {"name", "a_name"}, "source.captions")
        self.cfg, self.seed, self.root = cfg, seed, Path(cfg.root)
        missing = [n for pair in FILES.values() for n in pair if not (self.root / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found in {self.root} (missing {', '.join(missing)}); {SETUP_HINT}"
            )
        self._images: dict[str, np.ndarray] = {}
        self._labels: dict[str, np.ndarray] = {}
        for split, (img, lab) in FILES.items():
            self._images[split] = read_idx(self.root / img)
            self._labels[split] = read_idx(self.root / lab)
            if len(self._images[split]) != len(self._labels[split]):
                raise ValueError(
                    f"{self.root}: {split} has {len(self._images[split])} images but "
                    f"{len(self._labels[split])} labels"
                )

    def splits(self) -> dict[str, int]:
        return {split: len(labels) for split, labels in self._labels.items()}

    def item(self, split: str, index: int) -> SourceItem:
        label = int(self._labels[split][index])
        rid = f"fmnist-{split}-{index:05d}"
        caption = fill(self.cfg.captions, self.seed, rid, name=NOUNS[label])
        image = Image.fromarray(self._images[split][index], mode="L")
        return SourceItem(id=rid, image=image, caption=caption, label=label, name=NOUNS[label])

    def describe(self) -> dict[str, Any]:
        return {
            "type": "fashion_mnist",
            "name": "Fashion-MNIST",
            "root": str(self.root),
            "license": "MIT (Zalando Research)",
            "classes": CLASS_NAMES,
            "nouns": NOUNS,
            "caption_templates": list(self.cfg.captions),
            "size": [28, 28],
            "mode": self.mode,
        }
