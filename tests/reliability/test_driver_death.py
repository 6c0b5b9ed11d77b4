"""Defect 8 (driver death): a SIGKILLed driver left its workers training ~20 more steps and Ray helper
processes alive. Workers now watch their driver (twinflow.train.lifeline) and exit within a second."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import logged_steps
from .test_ray_startup import HERE, REPO, _env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _session_processes(session: str) -> list[str]:
    """Live processes whose command line names this Ray session (raylet, GCS, workers, agents)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session in cmd and _alive(int(d.name)):
            found.append(f"{d.name}: {cmd[:120]}")
    return found


def test_workers_end_promptly_when_the_driver_is_killed(fashion_small, tmp_path):
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "drive_job.py"),
            str(fashion_small),
            str(tmp_path),
            "orphan",
            "train.steps=5000",
            "train.checkpoint_every=5000",
        ],
        env=_env(),
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    run = tmp_path / "orphan"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if (run / "logs" / "metrics.jsonl").exists() and len(logged_steps(run)) >= 5:
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        pids = [int(p.read_text()) for p in sorted((run / "logs" / "workers").glob("rank*.pid"))]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        session = next(
            line.split(" ", 1)[1].strip()
            for line in (tmp_path / "driver.log").read_text().splitlines()
            if line.startswith("SESSION ")
        )
        session = Path(session).name
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_at, step_at_kill = time.time(), logged_steps(run)[-1]
        while any(_alive(p) for p in pids) and time.time() - killed_at < 30:
            time.sleep(0.1)
        gone_after = time.time() - killed_at
        assert not any(_alive(p) for p in pids), "workers still training 30 s after the driver died"
        assert gone_after < 5, f"workers took {gone_after:.1f} s to stop"
        assert logged_steps(run)[-1] - step_at_kill <= 3
        while _session_processes(session) and time.time() - killed_at < 30:  # raylet, GCS, helpers
            time.sleep(0.5)
        assert _session_processes(session) == []
    finally:
        if driver.poll() is None:
            driver.kill()
        log.close()
