"""Pipeline sources: one class per `source.type` of a pipeline YAML."""

from __future__ import annotations

from twinflow.data.sources.base import Source, SourceItem


def make_source(cfg, seed: int) -> Source:
    """The source named by ``cfg.type`` (imports only the module it needs)."""
    if cfg.type == "fashion_mnist":
        from twinflow.data.sources.fashion_mnist import FashionMnist

        return FashionMnist(cfg, seed)
    if cfg.type == "mnist_digits":
        from twinflow.data.sources.mnist_digits import MnistDigits

        return MnistDigits(cfg, seed)
    if cfg.type == "emoji":
        from twinflow.data.sources.emoji import Emoji

        return Emoji(cfg, seed)
    if cfg.type == "image_folder":
        from twinflow.data.sources.image_folder import ImageFolder

        return ImageFolder(cfg, seed)
    raise ValueError(f"unknown source type {cfg.type!r}")


__all__ = ["Source", "SourceItem", "make_source"]
