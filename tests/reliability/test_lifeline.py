"""The driver watch's decisions (twinflow.train.lifeline), without Ray: a dead or zombie driver on the
same node is dead; on another node only Ray's job table decides, and doubt never kills a worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twinflow.train import lifeline


def test_a_killed_driver_reads_dead_even_as_a_zombie():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    info = {"pid": child.pid, "node_id": "n1", "job_id": "01000000"}
    assert lifeline.driver_alive(info, "n1")
    child.kill()
    time.sleep(0.3)  # not yet reaped: a zombie
    assert not lifeline.pid_alive(child.pid)
    assert not lifeline.driver_alive(info, "n1")
    child.wait()
    assert not lifeline.driver_alive(info, "n1")


def test_another_nodes_driver_is_judged_by_the_job_table_and_doubt_keeps_workers():
    info = {"pid": 2**22 + 12345, "node_id": "elsewhere", "job_id": "01000000"}  # no such local pid
    assert lifeline.driver_alive(info, "n1")  # not our node; the job table is unreadable here: keep going
    assert lifeline.pid_alive(os.getpid())
