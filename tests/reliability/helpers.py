"""Small jobs for the integration tests (tests/reliability, tests/train): the tiny Fashion-MNIST job, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

from twinflow.train.config import load_job

JOBS = Path(__file__).resolve().parents[2] / "jobs"
MICRO = 8
WORLD = 2


def make_job(shards, out, name: str, *extra: str, base: str = "fashion_base_fm.yaml"):
    """2 workers x 8 rows, 4 steps, a checkpoint every 2, no eval prompts unless `extra` sets them."""
    return load_job(
        JOBS / base,
        [
            f"name={name}",
            f"data.path={shards}",
            f"output.dir={out}",
            "data.shuffle_buffer=32",
            f"train.micro_batch={MICRO}",
            "train.steps=4",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "eval.prompts=[]",
            "output.tensorboard=false",
            *extra,
        ],
    )


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "total" in r]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
