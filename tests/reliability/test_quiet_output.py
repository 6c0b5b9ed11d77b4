"""Issue 14 item 6: what a user sees from `twinflow train` on a local cluster. The demo printed every
progress line twice (Ray Train's print patch sends a worker's print to its logger AND the original
stream) in a flood of Ray's own output ("Failed to query ... State API" every second, worker-count
warnings, Ray Data plans). Now Ray's output stays in its log files, the driver prints rank 0's lines
from the run directory once each, and `--verbose` brings Ray's output back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_ray_startup import REPO, _env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_a_local_job_prints_each_progress_line_once_and_no_ray_chatter(fashion_small, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "twinflow",
            "train",
            "jobs/fashion_base_fm.yaml",
            f"--set=data.path={fashion_small}",
            f"--set=output.dir={tmp_path}",
            "--set=train.steps=3",
            "--set=train.micro_batch=8",
            "--set=train.log_every=1",
            "--set=train.checkpoint_every=3",
            "--set=data.shuffle_buffer=32",
            "--set=eval.prompts=[]",
            "--set=output.tensorboard=false",
        ],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=360,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    lines = text.splitlines()
    for step in (1, 2, 3):
        assert sum(f"step {step}/3 |" in line for line in lines) == 1, text
    assert "[twinflow] starting: " in text and "job fashion_base_fm FINISHED at step 3/3" in text
    for chatter in ("State API", "Failed to query", "(RayTrainWorker", "(raylet)", "(SplitCoordinator"):
        assert chatter not in text, text
    print(f"\n{len(lines)} lines of output:\n{text}")
    assert len(lines) <= 20, text
