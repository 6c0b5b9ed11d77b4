"""Eval tests: one intra-op thread (shared 2-core box), shared judges and tiny generators."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_generator(seed: int = 0, text_max_length: int = 8):
    """A 1-layer tiny-28g Qwen-Image-class generator, random init (what a checkpoint looks like)."""
    from twinflow.models import build_generator
    from twinflow.models.config import ModelConfig

    torch.manual_seed(seed)
    return build_generator(
        ModelConfig(
            family="qwen_image",
            preset="tiny-28g",
            text_max_length=text_max_length,
            backbone={"num_layers": 1},
        )
    ).eval()


@pytest.fixture(scope="session")
def mnist_judge():
    from twinflow.eval.judges import load_judge

    return load_judge("mnist")


@pytest.fixture(scope="session")
def mnist_reference(mnist_judge):
    from twinflow.eval.metrics import real_reference

    return real_reference(mnist_judge)


@pytest.fixture(scope="session")
def text_encoder():
    from twinflow.models.text_encoder import TextEncoder

    return TextEncoder(max_length=8)
