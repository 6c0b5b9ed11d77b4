"""Small shards of every shipped pipeline a shipped job reads, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _build(out: Path, pipeline: str, *overrides: str) -> Path:
    from twinflow.data import build_pipeline, load_pipeline

    cfg = load_pipeline(PIPELINES / pipeline, [f"output={out}", "shard_size=64", *overrides])
    build_pipeline(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def mnist_small(tmp_path_factory):
    """MNIST digits, 96 train / 32 eval records."""
    return _build(
        tmp_path_factory.mktemp("mnist") / "shards",
        "mnist_digits.yaml",
        "splits.train.count=96",
        "splits.eval.count=32",
    )


@pytest.fixture(scope="session")
def mnist_edits_small(tmp_path_factory):
    """MNIST edit pairs from 48 train / 16 eval digits (two edits each)."""
    return _build(
        tmp_path_factory.mktemp("mnist_edits") / "shards",
        "mnist_edits.yaml",
        "splits.train.count=48",
        "splits.eval.count=16",
    )
