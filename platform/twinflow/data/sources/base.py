"""What every pipeline source provides: named source splits of indexable records with captions."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

from PIL import Image


@dataclass
class SourceItem:
    id: str
    image: Image.Image
    caption: str
    label: int | None = None
    name: str | None = None  # the subject's noun, used by edit instructions ("rotate the {name}")


class Source(abc.ABC):
    """Records addressed by (source split, index). `item` may raise SkipRecord for a bad record."""

    mode: str = "RGB"  # PIL mode of every image: "L" or "RGB"

    @abc.abstractmethod
    def splits(self) -> dict[str, int]:
        """Source split name -> number of records (e.g. {"train": 60000, "test": 10000})."""

    @abc.abstractmethod
    def item(self, split: str, index: int) -> SourceItem: ...

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Provenance recorded in the manifest: what, where from, license."""
