"""Defect 4: Ray's placement-group cleaner removed a live job's workers. Without a dashboard its
state-API query went to the machine-wide default 127.0.0.1:8265, where another cluster's dashboard
(or nothing) answered; an actor unknown there reads as dead. `twinflow train` now starts Ray with its
own dashboard on a free port, so the cleaner asks the right cluster. Runs in a child process: the
test session's own Ray is already up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

PROBE = r"""
import json, sys
import ray
sys.path.insert(0, sys.argv[3])  # tests/reliability: its job helpers
from helpers import make_job
from twinflow.train.launcher import ensure_ray

ensure_ray(make_job(sys.argv[1], sys.argv[2], "probe"), None)

@ray.remote(num_cpus=0)
class Live:
    def me(self):
        return ray.get_runtime_context().get_actor_id()

@ray.remote(num_cpus=0)
def ask(actor_id):
    # what Ray's PlacementGroupCleaner does, from a worker process like it
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.train.v2._internal.state.util import is_actor_alive
    return {"api": get_address_for_submission_client(None), "alive": is_actor_alive(actor_id, 10),
            "unknown": is_actor_alive("ab" * 16, 10)}

live = Live.remote()
print(json.dumps({"dashboard": ray._private.worker.get_dashboard_url(), **ray.get(ask.remote(ray.get(live.me.remote())))}))
"""


def _env() -> dict[str, str]:
    dropped = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "TWINFLOW_VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_the_cleaner_asks_this_clusters_own_state_api(ray_cluster, fashion_small, tmp_path):
    """Asked from a worker while the session's own Ray also runs on this machine."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(fashion_small), str(tmp_path), str(HERE)],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["dashboard"] and probe["api"] == "http://" + probe["dashboard"]  # its own, not a guess
    assert probe["alive"] is True  # a live actor is seen alive: the check the cleaner makes
    assert not probe["unknown"]  # and an unknown one is not (what another cluster says of ours)


def test_the_session_cluster_serves_its_own_state_api(ray_cluster):
    """tests/conftest.py starts the session's Ray like `twinflow train` does: Train's cleaner (and
    anything else asking the state API) gets this cluster's answer, not "Failed to query"."""
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.util.state import list_nodes

    assert (
        get_address_for_submission_client(None) == "http://" + ray_cluster._private.worker.get_dashboard_url()
    )
    assert [n.node_id for n in list_nodes()] == [ray_cluster.get_runtime_context().get_node_id()]
