"""The driver watch's decisions (twinflow.train.lifeline): a dead or zombie driver on the same node is
dead; on another node only Ray's job table decides (a job it marks dead ends the workers), and doubt
never kills a worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import ray

from twinflow.train import lifeline


def test_a_killed_driver_reads_dead_even_as_a_zombie():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = {"pid": child.pid, "node_id": "n1", "job_id": "01000000"}
    assert lifeline.driver_alive(info, "n1")
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped: a zombie
    assert not lifeline.pid_alive(child.pid)
    assert not lifeline.driver_alive(info, "n1")
    child.wait()
    assert not lifeline.driver_alive(info, "n1")


def test_another_nodes_driver_is_judged_by_the_job_table_and_doubt_keeps_workers():
    info = {"pid": 2**22 + 12345, "node_id": "elsewhere", "job_id": "01000000"}  # no such local pid
    assert lifeline.driver_alive(info, "n1")  # not our node; the job table is unreadable here: keep going
    assert lifeline.pid_alive(os.getpid())


class _JobTable:
    """Answers get_all_job_info the way Ray's GCS client does: JobID keys, entries with is_dead."""

    def __init__(self, dead: dict[int, bool]):
        self.jobs = {ray.JobID.from_int(i): SimpleNamespace(is_dead=d) for i, d in dead.items()}

    def get_all_job_info(self, **_):
        return self.jobs


def test_a_job_the_table_marks_dead_ends_the_watch(monkeypatch):
    table = _JobTable({1: False, 2: True})
    monkeypatch.setattr(ray._private.worker, "global_worker", SimpleNamespace(gcs_client=table))
    assert lifeline.job_alive(ray.JobID.from_int(1).hex())
    assert not lifeline.job_alive(ray.JobID.from_int(2).hex())
    assert lifeline.job_alive(ray.JobID.from_int(3).hex())  # not listed: doubt keeps workers
    remote = {"pid": os.getpid(), "node_id": "elsewhere", "job_id": ray.JobID.from_int(2).hex()}
    assert not lifeline.driver_alive(remote, "n1")  # the pid is alive here, but it is not that node's
    remote["job_id"] = ray.JobID.from_int(1).hex()
    assert lifeline.driver_alive(remote, "n1")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_finished_driver_job_reads_dead_in_rays_table(ray_cluster):
    """Against the session cluster's real GCS: a driver that connected and exited is dead there."""
    ctx = ray_cluster.get_runtime_context()
    assert lifeline.job_alive(ctx.get_job_id())  # this session's own job
    code = "import ray; ray.init(address=%r); print(ray.get_runtime_context().get_job_id())"
    out = subprocess.run(
        [sys.executable, "-c", code % ctx.gcs_address],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    job_id = out.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 60
    while lifeline.job_alive(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)  # the GCS marks the job dead when it sees the driver disconnect
    assert not lifeline.job_alive(job_id)
    assert not lifeline.driver_alive({"pid": 1, "node_id": "elsewhere", "job_id": job_id}, ctx.get_node_id())
