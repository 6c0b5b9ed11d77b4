"""A run resumed by `twinflow train` on another worker count (end to end, through Ray Train): 2 workers
write steps 1-4, the rerun on 1 worker converts the step-4 checkpoint before Ray starts and trains
5-6, a rerun on 2 workers converts the 1-worker step-6 checkpoint and trains 7-8; every step is
logged once, the lr schedule goes on from the restored step. (Weights, Adam moments and the losses
against an uninterrupted run: tests/train/test_relayout_deepspeed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from twinflow.train import relayout
from twinflow.train.launcher import run_job
from twinflow.train.schedule import lr_factor

from .helpers import checkpoint_dirs, logged_steps, make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_to_one_to_two_workers_through_ray_train(ray_cluster, fashion_small, tmp_path, stage):
    def job(workers: int, steps: int):
        return make_job(
            fashion_small,
            tmp_path,
            f"relayout{stage}",
            f"cluster.num_workers={workers}",
            f"deepspeed.zero_stage={stage}",
            f"train.steps={steps}",
            "train.keep_checkpoints=4",
        )

    first = run_job(job(2, 4))
    assert first.ok, first.error
    run = Path(first.run_dir)
    one_stage = 0 if stage == 2 else 3  # one worker runs ZeRO-1/2 as stage 0

    second = run_job(job(1, 6))
    assert second.ok, second.error
    step4 = checkpoint_dirs(run)[1]
    assert relayout.verify(step4) == [] and relayout.record(step4)["source"] == {
        "world": 2,
        "zero_stage": stage,
    }
    log = (run / "logs" / "checkpoints.log").read_text()
    assert (
        f"restored checkpoint {step4} (step 4) through its universal conversion "
        f"(2 worker(s) at ZeRO stage {stage} -> 1 worker(s) at ZeRO stage {one_stage})"
    ) in log

    third = run_job(job(2, 8))
    assert third.ok, third.error
    step6 = checkpoint_dirs(run)[2]
    assert relayout.record(step6)["source"] == {"world": 1, "zero_stage": one_stage}
    assert (
        f"restored checkpoint {step6} (step 6) through its universal conversion"
        in (run / "logs" / "checkpoints.log").read_text()
    )
    assert logged_steps(run) == list(range(1, 9))  # each step once: no step retrained or skipped
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    cfg = job(2, 8)
    warmup, base = cfg.train.warmup_steps, cfg.train.lr
    assert all(abs(lr[s] - base * lr_factor(s - 1, warmup)) < 1e-12 for s in range(1, 9))
