"""Defect 8 (driver death): a SIGKILLed driver left its workers training ~20 more steps and Ray helper
processes alive. Workers now watch their driver (twinflow.train.lifeline) and exit within a second.

No test here for a driver that joined a running cluster by `--address`: on one machine Ray's ownership
(the driver owns the Train controller, which owns the workers) ends them ~3 s after the SIGKILL with or
without the watch (measured), so such a test passed on the old code too and proved nothing of ours."""

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


def _start_driver(shards, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "driver.log", "w")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                str(HERE / "drive_job.py"),
                str(shards),
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
    finally:
        log.close()


def _kill_when_training(driver: subprocess.Popen, tmp_path) -> tuple[list[int], float, int]:
    """SIGKILL the driver once its 2 workers logged 5 steps; (worker pids, kill time, last step)."""
    run = tmp_path / "orphan"
    deadline = time.time() + 240
    while time.time() < deadline:
        if (run / "logs" / "metrics.jsonl").exists() and len(logged_steps(run)) >= 5:
            break
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(0.5)
    pids = [int(p.read_text()) for p in sorted((run / "logs" / "workers").glob("rank*.pid"))]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    return pids, time.time(), logged_steps(run)[-1]


def _assert_workers_end_promptly(pids: list[int], killed_at: float, step_at_kill: int, run: Path) -> None:
    while any(_alive(p) for p in pids) and time.time() - killed_at < 30:
        time.sleep(0.1)
    gone_after = time.time() - killed_at
    more = logged_steps(run)[-1] - step_at_kill
    print(f"\nworkers gone {gone_after:.2f} s after the driver's SIGKILL, {more} more steps")
    assert not any(_alive(p) for p in pids), "workers still training 30 s after the driver died"
    assert gone_after < 5, f"workers took {gone_after:.1f} s to stop"
    assert logged_steps(run)[-1] - step_at_kill <= 3


def test_workers_end_promptly_when_the_driver_is_killed(fashion_small, tmp_path):
    """The driver started the local cluster itself (Ray's fate-sharing also takes it down)."""
    driver = _start_driver(fashion_small, tmp_path)
    try:
        pids, killed_at, step_at_kill = _kill_when_training(driver, tmp_path)
        session = next(
            line.split(" ", 1)[1].strip()
            for line in (tmp_path / "driver.log").read_text().splitlines()
            if line.startswith("SESSION ")
        )
        session = Path(session).name
        _assert_workers_end_promptly(pids, killed_at, step_at_kill, tmp_path / "orphan")
        while _session_processes(session) and time.time() - killed_at < 30:  # raylet, GCS, helpers
            time.sleep(0.5)
        assert _session_processes(session) == []
    finally:
        if driver.poll() is None:
            driver.kill()
