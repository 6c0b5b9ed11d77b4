"""The sweep file the integration sweeps run (tests/tune, tests/tracking): the tiny Fashion job, one
worker, 4 steps, a checkpoint every 2, a sample grid at 1 NFE, evaluated at 1 and 2 NFE on 16 samples."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


def make_sweep(
    tmp_path: Path,
    shards: Path,
    name: str,
    search_space: dict,
    *,
    overrides: dict | None = None,
    cache: Path,
    **top,
) -> Path:
    spec = {
        "name": name,
        "base_job": str(REPO / "jobs" / "fashion_twinflow.yaml"),
        "overrides": {
            "data.path": str(shards),
            "data.shuffle_buffer": 32,
            "cluster.num_workers": 1,
            "data.embed_cache": True,
            "data.embed_cache_path": str(cache),
            "method.teacher": "online",
            "train.steps": STEPS,
            "train.micro_batch": 8,
            "train.checkpoint_every": 2,
            "train.log_every": 1,
            "train.init_from": None,
            "eval.prompts": ["a photo of a sneaker", "a photo of a bag"],
            "eval.images_per_prompt": 2,
            "eval.nfe": [1],
            "eval.metrics": False,
            "output.tensorboard": False,
            **(overrides or {}),
        },
        "search_space": search_space,
        "evaluation": {"nfe": [1, 2], "samples": 16, "reference": 16, "grid_images_per_prompt": 2},
        "metric": "eval/fd_nfe1",
        "storage": str(tmp_path / "sweeps"),
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
