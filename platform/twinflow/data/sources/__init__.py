"""Pipeline sources: one class per `source.type` of a pipeline YAML."""

from __future__ import annotations

from twinflow.data.sources.base import Source, SourceItem
from twinflow.data.sources.emoji import Emoji
from twinflow.data.sources.fashion_mnist import FashionMnist
from twinflow.data.sources.image_folder import ImageFolder
from twinflow.data.sources.mnist_digits import MnistDigits

SOURCES: dict[str, type[Source]] = {
    "fashion_mnist": FashionMnist,
    "mnist_digits": MnistDigits,
    "emoji": Emoji,
    "image_folder": ImageFolder,
}


def make_source(cfg, seed: int) -> Source:
    """The source named by ``cfg.type``."""
    source = SOURCES.get(cfg.type)
    if source is None:
        raise ValueError(f"unknown source type {cfg.type!r}; known: {', '.join(SOURCES)}")
    return source(cfg, seed)


__all__ = ["SOURCES", "Source", "SourceItem", "make_source"]
