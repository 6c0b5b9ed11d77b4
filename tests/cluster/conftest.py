"""Small shards of every shipped pipeline a shipped job reads, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"


def _shards(pipeline: str, train: int, eval_: int, doc: str):
    """A session fixture building `pipeline` with `train` / `eval_` records in 64-record shards."""

    @pytest.fixture(scope="session")
    def build(tmp_path_factory) -> Path:
        from twinflow.data import build_pipeline, load_pipeline

        out = tmp_path_factory.mktemp(Path(pipeline).stem) / "shards"
        overrides = [
            f"output={out}",
            "shard_size=64",
            f"splits.train.count={train}",
            f"splits.eval.count={eval_}",
        ]
        build_pipeline(load_pipeline(PIPELINES / pipeline, overrides), progress=False)
        return out

    build.__doc__ = doc
    return build


mnist_small = _shards("mnist_digits.yaml", 96, 32, "MNIST digits, 96 train / 32 eval records.")
mnist_edits_small = _shards(
    "mnist_edits.yaml", 48, 16, "MNIST edit pairs from 48 train / 16 eval digits (two edits each)."
)
