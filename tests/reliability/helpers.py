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


EVAL = (  # the final step's sample grid and judge metrics at 1 and 2 NFE
    "eval.prompts=[a photo of a sneaker, a photo of a bag]",
    "eval.nfe=[1, 2]",
    "eval.images_per_prompt=2",
    "eval.metric_images_per_prompt=8",
)


def check_finished(result, steps: int) -> Path:
    """A job run with `EVAL` that finished every step once; its run directory."""
    assert result.ok, result.error
    assert result.state == "FINISHED"
    assert result.steps == steps
    run = Path(result.run_dir)
    assert logged_steps(run) == list(range(1, steps + 1))  # every step logged once, none twice
    # samples_seen is carried in the checkpoint: any replayed step would inflate it
    assert result.metrics["samples_seen"] == steps * MICRO * WORLD
    assert (run / "samples" / "final.png").stat().st_size > 0
    assert json.loads((run / "summary.json").read_text())["state"] == "FINISHED"
    return run
