"""The multi-node drill's driver: a 3-node local Ray cluster (head + two 2-CPU "machines"), a 2-worker
job checkpointing to S3, one machine removed mid-run and a replacement added; prints a JSON report.

`python drill.py <shards> <s3://bucket/prefix> <endpoint> <report.json>` (run by test_multinode_drill.py)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

CKPT_EVERY = 4
STEPS = 12
REMOVE_AFTER_STEP = 6  # past the first checkpoint (step 4), before the second (step 8)


def main(shards: str, out: str, endpoint: str, report: str) -> int:
    import ray
    from helpers import logged_steps, make_job  # this script's folder is first on sys.path
    from ray.cluster_utils import Cluster

    from twinflow.storage import list_files
    from twinflow.train.launcher import API_SERVER_ENV, free_port, run_dir_of, run_job

    port = free_port()  # the cluster's own state API, named for every process (launcher.ensure_ray)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": port,
            "object_store_memory": 200 * 1024**2,
        },
    )
    # Cluster records its head in /tmp/ray/ray_current_cluster, and every plain ray.init() on this
    # machine then tries to join it (and fails with num_cpus): put back what was there.
    if before is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(before)
    machine = dict(num_cpus=2, object_store_memory=150 * 1024**2)
    cluster.add_node(**machine)
    doomed = cluster.add_node(**machine)
    cluster.wait_for_nodes()
    cluster.connect()
    # 2 CPUs per worker: the 1-CPU head fits none, so each worker lands on its own machine
    job = make_job(
        shards,
        out,
        "drill",
        f"train.steps={STEPS}",
        f"train.checkpoint_every={CKPT_EVERY}",
        "train.keep_checkpoints=2",
        "cluster.cpus_per_worker=2",
        "data.decode_num_cpus=0.25",
        "data.embed_num_cpus=0.25",
        f"output.s3_endpoint={endpoint}",
    )
    run = run_dir_of(job)
    holder: dict = {}
    t = threading.Thread(target=lambda: holder.update(result=run_job(job, fresh=True)), daemon=True)
    t.start()
    t0 = time.time()
    while not (run / "logs" / "metrics.jsonl").exists() or max(logged_steps(run) or [0]) < REMOVE_AFTER_STEP:
        if not t.is_alive() or time.time() - t0 > 400:
            raise SystemExit(f"the job never reached step {REMOVE_AFTER_STEP}: {holder}")
        time.sleep(0.2)
    removed_at = max(logged_steps(run))
    cluster.remove_node(doomed, allow_graceful=False)  # the machine is gone: raylet, worker and all
    t_removed = time.time()
    time.sleep(3)
    cluster.add_node(**machine)  # its replacement joins
    t.join(timeout=600)
    result = holder.get("result")
    notes = (
        (run / "logs" / "checkpoints.log").read_text() if (run / "logs" / "checkpoints.log").exists() else ""
    )
    restored = [
        int(line.rsplit("(step ", 1)[1].rstrip(")")) for line in notes.splitlines() if "(step " in line
    ]
    remote = list_files(out.rstrip("/") + "/drill", endpoint)
    errors = run / "logs" / "errors.log"
    Path(report).write_text(
        json.dumps(
            {
                "ok": bool(result and result.ok),
                "error": result.error if result else "no result",
                "state": result.state if result else None,
                "steps": result.steps if result else None,
                "samples_seen": (result.metrics or {}).get("samples_seen") if result else None,
                "removed_at_step": removed_at,
                "restored_steps": restored,
                "logged_steps": logged_steps(run),
                "recovery_s": round(time.time() - t_removed, 1),
                "remote_checkpoints": sorted(
                    {f.split("/")[0] for f in remote if f.startswith("checkpoint_") and "/" in f}
                ),
                "worker_errors": errors.read_text()[-8000:] if errors.exists() else None,
                "checkpoint_every": CKPT_EVERY,
                "total_steps": STEPS,
            },
            indent=1,
        )
    )
    ray.shutdown()  # disconnect first: removing the head under a connected driver fails the exit
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # the report is written; skip interpreter teardown of the finished cluster's threads
