"""Bad-record counters on Ray: one named actor per (data config, purpose), shared by the training
stream (`twinflow.data.streaming`) and the embedding-cache build (`twinflow.data.embed_cache`), which
report the records they skip through a picklable `RayTracker` handle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from twinflow.data.bad_records import BadDataError, BadRecord, BadRecordLog
from twinflow.data.config import DataConfig

log = logging.getLogger("twinflow.data")


class BadRecordCounter:
    """Ray actor body: the one BadRecordLog of a streamed split (ids de-duplicated across epochs)."""

    def __init__(self, expected: int, max_bad_fraction: float, what: str) -> None:
        self.log = BadRecordLog(expected=expected, max_bad_fraction=max_bad_fraction, what=what)

    def add(self, records: list[BadRecord]) -> tuple[bool, str]:
        for r in records:
            self.log.entries.setdefault(r.reason, {}).setdefault(r.id, r)
        over = self.log.count > self.log.budget
        return over, self.log.message() if over else ""

    def summary(self) -> dict[str, Any]:
        return self.log.summary()

    def records(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(r) for r in self.log.records()]


class RayTracker:
    """A picklable handle that stages use to report bad records; raises past the budget."""

    def __init__(self, name: str, actor: Any = None) -> None:
        self.name = name
        self._actor = actor

    def _handle(self):
        if self._actor is None:
            self._actor = ray.get_actor(self.name)
        return self._actor

    def report(self, records: list[BadRecord]) -> None:
        if not records:
            return
        over, message = ray.get(self._handle().add.remote(records))
        for r in records[:5]:
            log.warning("skipping bad record (%s) %s: %s", r.reason, r.id, r.detail)
        if over:
            raise BadDataError(message)

    def summary(self) -> dict[str, Any]:
        return ray.get(self._handle().summary.remote())

    def records(self) -> list[dict[str, Any]]:
        """Every bad record (not only the first ids of the summary), as dicts."""
        return ray.get(self._handle().records.remote())


# Non-detached actors die with their last handle: the driver keeps one per tracker for the session.
_LIVE_TRACKERS: dict[str, Any] = {}


def on_driver_node() -> dict[str, Any]:
    """Actor options that keep a job's bookkeeping actors (bad-record counters, the caption table, the
    sweep's placement-group registry) on the node of the driver that makes them. Ray would place a
    zero-CPU actor on any node; on a worker machine it dies with that machine and takes every data
    task that reports to it down too, so losing one machine failed the whole job. The driver's node
    lives as long as the job does."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def tracker_name(cfg: DataConfig, purpose: str = "stream") -> str:
    """One counter per (config, purpose): epochs over the same dataset share it, other configs do not."""
    key = f"{purpose}|{cfg.model_dump_json()}"
    return "twinflow-bad-records-" + hashlib.sha1(key.encode()).hexdigest()[:16]


def make_tracker(name: str, expected: int, max_bad_fraction: float, what: str = "records") -> RayTracker:
    actor_cls = ray.remote(num_cpus=0)(BadRecordCounter)
    handle = actor_cls.options(name=name, get_if_exists=True, **on_driver_node()).remote(
        expected, max_bad_fraction, what
    )
    # a rerun in the same driver gets the existing counter back: keep the handle that made it, whose
    # loss would end the actor (a handle got by name does not keep it alive)
    kept = _LIVE_TRACKERS.get(name)
    if kept is not None and kept._actor_id == handle._actor_id:
        handle = kept
    _LIVE_TRACKERS[name] = handle
    return RayTracker(name, handle)


def live_tracker(name: str) -> RayTracker:
    """The handle of tracker `name`: the driver's own when it made it, else looked up by name."""
    return RayTracker(name, _LIVE_TRACKERS.get(name))
