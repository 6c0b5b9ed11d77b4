"""A worker error that would recur on every attempt ends the run at once, with its own message on the
driver, instead of Ray Train restarting it `train.max_failures` times to fail the same way."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from twinflow.train.config import load_job
from twinflow.train.launcher import run_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_file_on_the_workers_is_not_retried(ray_cluster, fashion_small, tmp_path):
    not_an_export = tmp_path / "not_an_export"  # exists (pre-flight passes) but holds no twinflow.json
    not_an_export.mkdir()
    job = load_job(
        REPO / "jobs" / "fashion_twinflow.yaml",
        [
            f"data.path={fashion_small}",
            f"output.dir={tmp_path / 'runs'}",
            f"train.init_from={not_an_export}",
            "train.max_failures=3",
            "train.steps=2",
            "train.micro_batch=8",
            "cluster.num_workers=1",
            "data.shuffle_buffer=32",
            "eval.prompts=[]",
            "output.tensorboard=false",
        ],
    )
    t0 = time.perf_counter()
    out = run_job(job)
    assert not out.ok and out.state == "ERRORED"
    first_line = out.error.splitlines()[0]
    assert (
        first_line == f"rank 0: FileNotFoundError: {not_an_export}: not a TwinFlow export (no twinflow.json)"
    )
    # one attempt: the worker logged its traceback once (each of 4 attempts would append one)
    errors = (Path(out.run_dir) / "logs" / "errors.log").read_text()
    assert errors.count("(worker traceback)") == 1, errors
    print(f"\nstopped after {time.perf_counter() - t0:.0f} s")
