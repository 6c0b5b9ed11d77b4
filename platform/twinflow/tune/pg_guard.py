"""Guard against ray#54305: a Tune trial stopped early leaks its Ray Train placement group.

Tune over Train: each trial's function trainable runs a TorchTrainer, whose TrainController actor
creates the placement group of the worker group. When the scheduler stops the trial, Tune terminates
the trial actor; the controller dies with it, but a placement group lives as long as the *job* that
created it (the sweep driver), so its CPUs/GPUs stay reserved and the next trial waits forever for
them. (Ray's own PlacementGroupCleaner asks the state API whether the controller is alive; without a
dashboard that call fails and it never cleans up. The local clusters `twinflow train/tune` start now
run their own dashboard (launcher.ensure_ray, docs/reliability.md), so the cleaner works there; the
guard stays for clusters joined by address without a dashboard, and it releases as the trial ends
instead of at the cleaner's next poll.)

The guard has three parts:

- `RecordTrainRun`, a Train controller callback (passed in the trial's RunConfig callbacks), records
  the controller's handle and every placement group it starts a worker group in, by Tune trial id, in
- `PlacementGroupRegistry`, a small named actor the sweep driver owns;
- `ReleaseTrialResources`, a Tune callback: when a trial completes, is stopped or errors, it aborts the
  trial's controller (Train's graceful abort: stop workers, remove the group), kills it if it does not
  answer, then removes any recorded placement group still alive. At the end of the experiment
  (including an interrupted one) it does the same for every trial left.

`release_placement_groups: false` in a sweep YAML keeps the records but releases nothing (to reproduce
the bug: tests/tune/test_sweep_integration.py with TWINFLOW_TUNE_REPRODUCE_54305=1).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from twinflow.data.tracking import on_driver_node

logger = logging.getLogger(__name__)

try:  # internal Train V2 callback bases; a plain object keeps the module importable on other Rays
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
except ImportError:  # pragma: no cover
    ControllerCallback = WorkerGroupCallback = object  # type: ignore[misc,assignment]

ABORT_TIMEOUT_S = 10.0


class PlacementGroupRegistry:
    """Trial id -> the Train controller handle and the placement groups it created; plus a log of releases."""

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}
        self._log: list[dict[str, Any]] = []

    def add_controller(self, trial_id: str, handle) -> None:
        self._runs.setdefault(trial_id, {"controllers": [], "pgs": []})["controllers"].append(handle)

    def add_pg(self, trial_id: str, pg_hex: str) -> None:
        self._runs.setdefault(trial_id, {"controllers": [], "pgs": []})["pgs"].append(pg_hex)

    def take(self, trial_id: str) -> dict[str, Any] | None:
        return self._runs.pop(trial_id, None)

    def pgs(self, trial_id: str) -> list[str]:
        return list(self._runs.get(trial_id, {}).get("pgs", []))

    def trial_ids(self) -> list[str]:
        return list(self._runs)

    def log(self, entry: dict[str, Any]) -> None:
        self._log.append(entry)

    def released(self) -> list[dict[str, Any]]:
        return list(self._log)


def registry_name(sweep_name: str) -> str:
    return f"twinflow-tune-pgs:{sweep_name}"


_OWNED: dict[
    str, Any
] = {}  # the driver keeps its registries' handles: a named actor dies with its last handle


def get_registry(name: str, create: bool = False):
    if create:
        handle = (
            ray.remote(num_cpus=0)(PlacementGroupRegistry)
            .options(name=name, get_if_exists=True, **on_driver_node())
            .remote()
        )
        _OWNED[name] = handle
        return handle
    return ray.get_actor(name)


class RecordTrainRun(ControllerCallback, WorkerGroupCallback):
    """Runs inside the Train controller: tells the registry who it is and where its workers live."""

    def __init__(self, registry: str, trial_id: str):
        self.registry = registry
        self.trial_id = trial_id

    def _registry(self):
        try:
            return get_registry(self.registry)
        except ValueError:
            logger.warning("placement-group registry %s not found; ray#54305 guard inactive", self.registry)
            return None

    def after_controller_start(self, train_run_context) -> None:
        reg = self._registry()
        if reg is not None:
            ray.get(reg.add_controller.remote(self.trial_id, ray.get_runtime_context().current_actor))

    def after_worker_group_start(self, worker_group) -> None:
        reg = self._registry()
        if reg is None:
            return
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ray.get(reg.add_pg.remote(self.trial_id, pg.id.hex()))


def pg_state(pg_hex: str) -> str:
    from ray.util.placement_group import placement_group_table

    return str(placement_group_table(_pg(pg_hex)).get("state", "UNKNOWN"))


def _pg(pg_hex: str):
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))


def _abort(handle) -> str:
    """Train's graceful abort (stops the workers, removes the group); kill when it does not answer."""
    try:
        ray.get(handle.abort.remote(), timeout=ABORT_TIMEOUT_S)
        return "finished"  # abort() returns without exiting only when the run had already ended
    except ray.exceptions.RayActorError:
        return "aborted"  # exit_actor inside abort, or already dead
    except ray.exceptions.GetTimeoutError:
        ray.kill(handle, no_restart=True)
        return "killed"


def release_trial(registry, trial_id: str) -> dict[str, Any] | None:
    """Stop what a finished/stopped trial left behind; return what was found and done."""
    from ray.util.placement_group import remove_placement_group

    run = ray.get(registry.take.remote(trial_id))
    if run is None:
        return None
    entry: dict[str, Any] = {"trial_id": trial_id, "controllers": [], "pgs": {}}
    for handle in run["controllers"]:
        entry["controllers"].append(_abort(handle))
    for pg_hex in run["pgs"]:
        state = pg_state(pg_hex)
        entry["pgs"][pg_hex] = state
        if state != "REMOVED":
            remove_placement_group(_pg(pg_hex))
            deadline = time.monotonic() + 10
            while pg_state(pg_hex) != "REMOVED" and time.monotonic() < deadline:
                time.sleep(0.1)
            logger.warning(
                "ray#54305 guard: removed placement group %s of trial %s (was %s)", pg_hex, trial_id, state
            )
    entry["leaked"] = sorted(h for h, s in entry["pgs"].items() if s != "REMOVED")
    ray.get(registry.log.remote(entry))
    return entry


try:
    from ray.tune import Callback as _TuneCallback
except ImportError:  # pragma: no cover
    _TuneCallback = object  # type: ignore[misc,assignment]


class ReleaseTrialResources(_TuneCallback):
    """Tune driver callback: release a trial's Train resources as soon as the trial ends, however."""

    def __init__(self, registry: str):
        self.registry = registry

    def _release(self, trial_id: str) -> None:
        try:
            entry = release_trial(get_registry(self.registry), trial_id)
        except Exception:  # never let cleanup break the sweep; the next trial would show the leak
            logger.exception("ray#54305 guard: releasing trial %s failed", trial_id)
            return
        if entry and entry["leaked"]:
            logger.warning(
                "trial %s: released leaked placement group(s) %s (ray#54305); controller %s",
                trial_id,
                entry["leaked"],
                entry["controllers"],
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        try:
            ids = ray.get(get_registry(self.registry).trial_ids.remote())
        except Exception:
            return
        for trial_id in ids:
            self._release(trial_id)
