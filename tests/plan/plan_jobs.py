"""The jobs the plan tests plan: a job file with `--set`-style overrides (the way `twinflow plan
--set` and `benchmarks/plan_rehearsal.py` change one), optionally with a shrunk backbone, or with an
empty directory where the job's model files would be (a machine with no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MNIST_JOB = "jobs/mnist_twinflow.yaml"


def plan_job(path: str = MNIST_JOB, *sets: str, backbone: dict[str, Any] | None = None, **changes: Any):
    """`path` loaded with `sets` ("field=value") and `changes` (the same as keywords, dotted names
    passed as `**{"method.teacher": "ema"}`) applied; `backbone` overrides the preset's diffusers config."""
    from twinflow.train.config import load_job

    overrides = [*sets, *(f"{k}={v}" for k, v in changes.items())]
    if backbone is not None:
        overrides.append(f"model.backbone={json.dumps(backbone)}")
    return load_job(path, overrides=overrides)


def empty_pipeline(tmp_path: Path) -> Path:
    """A pipeline directory with no model files in it."""
    empty = tmp_path / "Qwen-Image"
    empty.mkdir(exist_ok=True)
    return empty


def no_weights(tmp_path: Path) -> list[str]:
    """Overrides that point the job's model files at an empty directory."""
    empty = empty_pipeline(tmp_path)
    return [f"model.pretrained_path={empty}", f"model.vae_path={empty}"]
