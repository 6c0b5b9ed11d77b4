"""What a user sees from `twinflow train` on a local cluster, and what Ray logs meanwhile.

Issue 14 item 6: the demo printed every progress line twice (Ray Train's print patch sends a worker's
print to its logger AND the original stream) in a flood of Ray's own output ("Failed to query ... State
API" every second, worker-count warnings, Ray Data plans). Now Ray's output stays in its log files, the
driver prints rank 0's lines from the run directory once each, and `--verbose` brings Ray's output back.

Defect 4 (test_ray_startup.py has the probe): Ray's placement-group cleaner removed a live job's workers
when its state-API query reached another cluster (or nothing). The same CLI job runs under CPU contention
(a busy core beside it, the session's own Ray up meanwhile), and its Ray session's logs show no misfire."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .test_ray_startup import REPO, _env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _session_dir(driver_pid: int) -> Path:
    """The Ray session a driver started: Ray names it session_<date>_<the driver's pid>."""
    from ray._common.utils import get_default_ray_temp_dir

    (found,) = Path(get_default_ray_temp_dir()).glob(f"session_*_{driver_pid}")
    return found


def test_a_local_job_prints_each_progress_line_once_and_no_ray_chatter(ray_cluster, fashion_small, tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a busy core beside the job
    try:
        driver = subprocess.Popen(
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
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = driver.communicate(timeout=540)
        finally:
            if driver.poll() is None:
                driver.kill()
    finally:
        hog.kill()
        hog.wait()
    text = stdout + stderr
    assert driver.returncode == 0, text[-4000:]
    lines = text.splitlines()
    for step in (1, 2, 3):
        assert sum(f"step {step}/3 |" in line for line in lines) == 1, text
    assert "[twinflow] starting: " in text and "job fashion_base_fm FINISHED at step 3/3" in text
    for chatter in ("State API", "Failed to query", "(RayTrainWorker", "(raylet)", "(SplitCoordinator"):
        assert chatter not in text, text
    print(f"\n{len(lines)} lines of output:\n{text}")
    assert len(lines) <= 20, text
    assert json.loads((tmp_path / "fashion_base_fm" / "summary.json").read_text())["state"] == "FINISHED"

    # what Ray logged meanwhile: the cleaner asked this cluster's own state API, and nobody guessed
    logs = "".join(
        p.read_text(errors="replace") for p in (_session_dir(driver.pid) / "logs").glob("*") if p.is_file()
    )
    assert logs, "no Ray logs found for the job's session"
    assert "Failed to query Ray Train Controller actor state" not in logs
    assert "Found multiple active Ray instances" not in logs  # nobody guessed which cluster is ours
    assert "Detected that the Ray Train controller actor" not in logs
