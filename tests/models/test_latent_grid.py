"""A latent model's training grid is decoded by the job's VAE: its samples are latents (4+ channels at
1/8 size), which are not images; drawing them crashed the first grid of every latent-cache job."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from twinflow.models import build_generator
from twinflow.models.config import ModelConfig
from twinflow.train import modelling
from twinflow.train.config import JobConfig


def test_latent_samples_are_decoded_before_the_grid(qwen_pipeline_dir, tmp_path):
    cfg = ModelConfig(pretrained_path=str(qwen_pipeline_dir), vae_path=str(qwen_pipeline_dir), image_size=32)
    gen = build_generator(cfg)
    assert gen.latent and gen.sample_shape[1] < 32  # it samples latents, not 32 px images
    job = JobConfig.model_validate(
        {
            "name": "latent_grid",
            "data": {"path": str(tmp_path), "image_size": 32, "channels": 3},
            "model": cfg.model_dump(),
            "method": {"name": "twinflow"},
            "train": {"steps": 1, "micro_batch": 4},
            "eval": {"prompts": ["a", "b"], "nfe": [1, 2], "images_per_prompt": 2},
        }
    )
    cond = {
        "text_states": torch.randn(2, gen.text_max_length, gen.text_dim),
        "text_mask": torch.ones(2, gen.text_max_length, dtype=torch.long),
    }
    out = tmp_path / "grid.png"
    modelling.sample_grid(job, gen, cond, out, rank=0)
    img = np.asarray(Image.open(out))
    # 2 NFE rows of 4 images of 32 px (plus the grid's labels and padding): decoded pixels, RGB
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    assert img.shape[0] >= 2 * 32 and img.shape[1] >= 4 * 32
