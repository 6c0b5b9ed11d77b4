from __future__ import annotations

import pytest
import torch

FAMILIES = ["qwen_image", "sana"]


def make_generator(family: str, preset: str = "tiny-28g", **overrides):
    from twinflow.models.config import ModelConfig
    from twinflow.models.generator import build_generator

    return build_generator(ModelConfig(family=family, preset=preset, **overrides))


def random_cond(b: int, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.int64)
    mask[:, length // 2 :] = 0
    return {"text_states": torch.randn(b, length, 384, generator=g) * mask[..., None], "text_mask": mask}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and OpenMP threads on a shared 2-core box can
    make a 10 ms step take a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def text_encoder():
    from twinflow.models.text_encoder import TextEncoder

    return TextEncoder(max_length=16)


@pytest.fixture(scope="session")
def qwen_pipeline_dir(tmp_path_factory):
    """A tiny random-init Qwen-Image pipeline in diffusers format (built once, about a second)."""
    from qwen_pipeline import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("qwen-image") / "pipe")
