"""`summary.json`: the latest attempt's result on top, and every attempt of the run in `attempts`.

A rerun that failed once replaced a FINISHED summary with ERRORED, so the record that the run had
finished (and where its export is) was lost. Now each attempt is appended, the newest FINISHED one is
kept under `finished`, and the file is replaced atomically (a crash mid-write leaves the old one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from twinflow.atomic_files import write_json_atomic


def read_summary(path: Path) -> dict[str, Any]:
    """The summary at `path`, {} when missing or unreadable (a pre-history file counts as one attempt)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    if "attempts" not in data and "state" in data:
        data = {**data, "attempts": [{k: v for k, v in data.items() if k != "attempts"}]}
    return data


def write_summary(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Record one attempt's `result` (a JobResult as a dict); returns what was written."""
    old = read_summary(path)
    attempt = {**result, "ended_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    attempts = list(old.get("attempts", [])) + [attempt]
    finished = next((a for a in reversed(attempts) if a.get("state") == "FINISHED"), None)
    body = {**attempt, "attempts": attempts, "finished": finished}
    write_json_atomic(path, body, indent=2, default=str)
    return body
