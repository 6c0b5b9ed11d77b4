"""The simulated multi-node drill (issue 15): a cluster user loses a machine mid-run. Three raylets on
this machine (ray.cluster_utils.Cluster), a 2-worker DeepSpeed job, one worker per "machine",
checkpoints on the S3 test server; one machine is removed after the first checkpoint and a
replacement joins. The job must resume from S3 and lose at most one checkpoint interval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import MICRO, WORLD
from .test_ray_startup import HERE, REPO, _env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_losing_a_machine_mid_run_resumes_from_s3(fashion_small, s3_server, bucket, tmp_path):
    from ray._private.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    report = tmp_path / "drill.json"
    env = {**_env(), "TWINFLOW_STAGING_DIR": str(tmp_path / "staging")}
    out = subprocess.run(
        [
            sys.executable,
            str(HERE / "drill.py"),
            str(fashion_small),
            f"s3://{bucket}/runs",
            s3_server,
            str(report),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert out.returncode == 0 and report.exists(), (out.stdout[-3000:], out.stderr[-4000:])
    r = json.loads(report.read_text())
    assert r["ok"] and r["state"] == "FINISHED" and r["steps"] == r["total_steps"], r
    assert r["restored_steps"], "the job never restored a checkpoint after losing a machine"
    lost = r["removed_at_step"] - r["restored_steps"][-1]
    assert 0 <= lost <= r["checkpoint_every"], r
    assert r["logged_steps"] == list(range(1, r["total_steps"] + 1))  # every step once after the resume
    assert r["samples_seen"] == r["total_steps"] * MICRO * WORLD
    assert r["remote_checkpoints"], "checkpoints did not reach S3"
    # the drill's cluster must not become the one every plain ray.init() on this machine joins
    assert (address_file.read_text() if address_file.exists() else None) == before
