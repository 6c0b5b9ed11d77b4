"""Bad-record accounting shared by the shard builder, the local iterator and the Ray Data stages.

A bad record is skipped, never silently: it is counted per reason with its id. The budget is absolute
(``floor(max_bad_fraction * expected records)``), so the job stops as soon as it is exceeded instead of
waiting for a fraction over an unknown total. Ids are de-duplicated, so a second epoch over the same
broken record does not count it twice.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

log = logging.getLogger("twinflow.data")

REASONS = ("decode_error", "missing_column", "empty_caption", "missing_shard", "missing_file")
IDS_SHOWN = 50
LOGGED_PER_REASON = 20


class BadDataError(RuntimeError):
    """More bad records than the configured budget; the message lists the counts per reason."""


@dataclass(frozen=True)
class BadRecord:
    """One skipped record (or, for a missing shard, ``weight`` records that share the shard's path as id)."""

    reason: str
    id: str
    detail: str = ""
    weight: int = 1

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown bad-record reason {self.reason!r}; expected one of {REASONS}")


class SkipRecord(Exception):
    """Raised by a source or decoder for one record; the caller counts it and moves on."""

    def __init__(self, reason: str, id: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {id}: {detail}")
        self.record = BadRecord(reason, id, detail)


@dataclass
class BadRecordLog:
    """Counts bad records against a budget of ``max_bad_fraction`` of ``expected`` records."""

    expected: int
    max_bad_fraction: float
    what: str = "records"
    entries: dict[str, dict[str, BadRecord]] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return math.floor(self.max_bad_fraction * self.expected)

    @property
    def count(self) -> int:
        return sum(r.weight for recs in self.entries.values() for r in recs.values())

    def counts(self) -> dict[str, int]:
        return {reason: sum(r.weight for r in recs.values()) for reason, recs in self.entries.items()}

    def add(self, record: BadRecord) -> bool:
        """Count ``record`` (True if new); raises BadDataError once the budget is exceeded."""
        bucket = self.entries.setdefault(record.reason, {})
        if record.id in bucket:
            return False
        bucket[record.id] = record
        if len(bucket) <= LOGGED_PER_REASON:
            log.warning(
                "skipping bad record (%s) %s%s",
                record.reason,
                record.id,
                f": {record.detail}" if record.detail else "",
            )
        self.check()
        return True

    def extend(self, records: Iterable[BadRecord]) -> None:
        for record in records:
            self.add(record)

    def check(self) -> None:
        if self.count > self.budget:
            raise BadDataError(self.message())

    def message(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items())) or "none"
        first = [f"{r.reason}:{r.id}" for recs in self.entries.values() for r in list(recs.values())[:5]]
        return (
            f"too many bad {self.what}: {self.count} of {self.expected} expected "
            f"(max_bad_fraction={self.max_bad_fraction} allows {self.budget}); by reason: {counts}; "
            f"first ids: {', '.join(first)}. Fix the data or raise max_bad_fraction."
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able report: totals, and per reason the count and (the first) ids with details."""
        return {
            "expected": self.expected,
            "bad": self.count,
            "fraction": self.count / self.expected if self.expected else 0.0,
            "max_bad_fraction": self.max_bad_fraction,
            "by_reason": {
                reason: {
                    "count": sum(r.weight for r in recs.values()),
                    "ids": [r.id for r in list(recs.values())[:IDS_SHOWN]],
                    "details": {r.id: r.detail for r in list(recs.values())[:IDS_SHOWN] if r.detail},
                }
                for reason, recs in sorted(self.entries.items())
            },
        }

    def records(self) -> list[BadRecord]:
        return [r for recs in self.entries.values() for r in recs.values()]

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)
