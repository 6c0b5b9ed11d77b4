"""Losing a worker machine must not take the job's bookkeeping actors with it. Ray places a zero-CPU
actor on any node: CI's multi-node drill lost the machine that held the bad-record counter, and every
data task reporting to it failed the job on both ranks. The counters, the caption table and the
sweep's placement-group registry now live on the driver's node. Runs in a child process with its own
3-node cluster (the test session's Ray is already up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, time
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

address_file = Path(ray._private.utils.get_ray_address_file(None))
before = address_file.read_text() if address_file.exists() else None
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 1024**2})
if before is None:  # Cluster makes itself every plain ray.init()'s default: put back what was there
    address_file.unlink(missing_ok=True)
else:
    address_file.write_text(before)
for _ in range(2):
    cluster.add_node(num_cpus=2, object_store_memory=80 * 1024**2)
cluster.wait_for_nodes()
cluster.connect()
driver = ray.get_runtime_context().get_node_id()

@ray.remote(num_cpus=1)
def busy():
    time.sleep(10)

load = [busy.remote() for _ in range(5)]  # the driver's node is as busy as the machines
time.sleep(2)

from twinflow.data.caption_refs import open_table
from twinflow.data.tracking import make_tracker
from twinflow.tune.pg_guard import get_registry

def node_of(handle):
    return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))

nodes = {}
for i in range(4):
    nodes[f"tracker{i}"] = node_of(make_tracker(f"drill-tracker-{i}", 10, 0.1)._handle())
    nodes[f"table{i}"] = node_of(open_table(f"drill-table-{i}"))
for i in range(2):
    nodes[f"registry{i}"] = node_of(get_registry(f"drill-registry-{i}", create=True))
print(json.dumps({"driver": driver, "nodes": nodes}))
ray.shutdown()
cluster.shutdown()
"""


def test_bookkeeping_actors_live_on_the_drivers_node():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    elsewhere = {k: v for k, v in report["nodes"].items() if v != report["driver"]}
    assert not elsewhere, f"placed off the driver's node {report['driver']}: {elsewhere}"
