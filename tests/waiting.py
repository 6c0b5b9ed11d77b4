"""Waiting for a service the test started (a Ray head, a Serve app) to come up.

The bound is how long a test waits before it gives up on a start, not a measurement: a start that
never comes raises TimeoutError with what the service said, instead of hanging the suite."""

from __future__ import annotations

import time
from typing import Callable


def wait_until(
    ready: Callable[[], object], timeout_s: float, what: Callable[[], str], interval_s: float = 0.5
):
    """Call `ready()` every `interval_s` until it returns something true (returned); after `timeout_s`,
    TimeoutError carrying `what()` (e.g. the service's log tail). `ready` may raise to fail at once."""
    deadline = time.monotonic() + timeout_s
    while not (result := ready()):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not ready after {timeout_s:g} s:\n{what()}")
        time.sleep(interval_s)
    return result
