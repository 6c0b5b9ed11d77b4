"""Every shipped job YAML validates; bad job files fail with the file and field named."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.train.config import load_job
from twinflow.train.engine import deepspeed_config

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


def test_jobs_exist():
    assert len(JOBS) >= 2


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_shipped_job_validates(path):
    job = load_job(path)
    assert path.read_text().startswith(f"# twinflow train jobs/{path.name}")
    cfg = deepspeed_config(job.deepspeed, job.train, job.cluster.num_workers)
    assert cfg["train_batch_size"] == job.train.micro_batch * job.cluster.num_workers


def test_override_and_bad_field(tmp_path):
    job = load_job(JOBS[0], ["train.steps=7", "deepspeed.zero_stage=3"])
    assert job.train.steps == 7 and job.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage"):
        load_job(JOBS[0], ["deepspeed.zero_stage=5"])
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown field"):
        load_job(JOBS[0], ["train.lrr=1"])
