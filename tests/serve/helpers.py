"""Shared by the serve tests and fixtures: a tiny trained checkpoint, app args, a free port."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
FASHION_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
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
TEXT_LEN = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fashion(n: int) -> tuple[torch.Tensor, list[str]]:
    from twinflow.data.sources.fashion_mnist import read_idx

    images = read_idx(FASHION)[:n].astype(np.float32) / 127.5 - 1.0
    labels = read_idx(FASHION_LABELS)[:n]
    return torch.from_numpy(images)[:, None], [f"a photo of a {NOUNS[int(c)]}" for c in labels]


def train_tiny(out: Path, *, steps: int, seed: int, metadata: dict, init=None):
    """Plain-torch flow matching on real Fashion-MNIST images: a tiny Qwen-Image generator, exported."""
    from twinflow.method import FlowMatchingObjective
    from twinflow.method.config import FlowMatchingConfig
    from twinflow.models import ModelConfig, TextEncoder, build_generator, save_generator

    torch.manual_seed(seed)
    gen = (
        init
        if init is not None
        else build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=TEXT_LEN))
    )
    x, captions = _fashion(32)
    enc = TextEncoder(max_length=TEXT_LEN, cache_size=0)
    cond_all = enc.encode(captions)
    null = enc.null_condition()
    obj = FlowMatchingObjective(FlowMatchingConfig(loss="mse", cond_dropout=0.1))
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    gen.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (8,), generator=g)
        out_ = obj(gen, x[idx], {k: v[idx] for k, v in cond_all.items()}, null_cond=null, generator=g)
        opt.zero_grad()
        out_.loss.backward()
        opt.step()
    gen.eval()
    save_generator(gen, out, {"method": "flow_matching", "steps": steps, **metadata})
    return gen


def app_args(exports: dict[str, Path], **extra) -> dict:
    args = {
        "models": [{"id": k, "path": str(v)} for k, v in exports.items()],
        "limits": {
            "max_nfe": 8,
            "max_images": 4,
            "max_prompt_chars": 100,
            "max_image_bytes": 64 * 1024,
            "max_image_side": 256,
            "max_image_pixels": 200 * 200,
            "body_timeout_s": 3.0,
            "max_body_readers": 32,
        },
        "batching": {"max_batch_images": 16, "batch_wait_timeout_s": 0.05},
        "auth_token_env": None,
    }
    args.update(extra)
    return args
