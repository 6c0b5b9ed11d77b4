"""Workers end when their driver dies.

A SIGKILLed driver left its Train workers stepping for ~20 more steps (Ray tears the job down only
after noticing the driver is gone, through the controller). Each worker now runs a daemon thread that
checks, twice a second, that the process which started the job still exists (same node: its pid) and
that Ray still counts the job alive; when either is gone the worker exits at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

CHECK_EVERY_S = 0.5


def driver_info() -> dict[str, Any] | None:
    """Who to watch: this process (the one building the trainer), its node and Ray job; None where
    Ray cannot say (e.g. a Ray Client driver), and then nothing is watched."""
    import ray

    try:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "job_id": ctx.get_job_id()}
    except Exception:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def job_alive(job_id: str) -> bool:
    """Ray's job table says the job is not dead (True when it cannot be read: never kill on doubt)."""
    try:
        import ray

        infos = ray._private.worker.global_worker.gcs_client.get_all_job_info(
            skip_submission_job_info_field=True, skip_is_running_tasks_field=True
        )
        for jid, info in infos.items():
            if (jid.hex() if hasattr(jid, "hex") else str(jid)) == job_id:
                return not info.is_dead
    except Exception:
        return True
    return True


def driver_alive(info: dict[str, Any], node_id: str) -> bool:
    if info.get("node_id") == node_id and not pid_alive(int(info["pid"])):
        return False
    return job_alive(str(info.get("job_id", "")))


def watch_driver(
    info: dict[str, Any] | None, on_death: Callable[[], None] | None = None
) -> threading.Thread | None:
    """Start the watcher thread in a Train worker; `on_death` defaults to printing and os._exit(1)."""
    if not info:
        return None
    import ray

    node_id = ray.get_runtime_context().get_node_id()

    def die() -> None:
        log.warning("the driver (pid %s) is gone: this worker exits", info["pid"])
        os._exit(1)

    def loop() -> None:
        while True:
            time.sleep(CHECK_EVERY_S)
            if not driver_alive(info, node_id):
                (on_death or die)()
                return

    thread = threading.Thread(target=loop, name="twinflow-driver-watch", daemon=True)
    thread.start()
    return thread
