"""`tests/waiting.wait_until`, the one wait the integration tests use for a service to come up."""

from __future__ import annotations

import pytest

from tests.waiting import wait_until


def test_returns_the_first_true_answer():
    answers = iter([None, "", "RUNNING", "later"])
    assert wait_until(lambda: next(answers), 5, lambda: "never", interval_s=0) == "RUNNING"


def test_gives_up_with_what_the_service_said():
    with pytest.raises(TimeoutError, match="not ready after 0.05 s:\nlog tail"):
        wait_until(lambda: False, 0.05, lambda: "log tail", interval_s=0.01)


def test_a_failure_inside_ready_ends_the_wait_at_once():
    def ready():
        raise AssertionError("DEPLOY_FAILED")

    with pytest.raises(AssertionError, match="DEPLOY_FAILED"):
        wait_until(ready, 60, lambda: "unused")
