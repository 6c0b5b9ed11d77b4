"""A failed job keeps every rank's full traceback in logs/errors.log: Ray Train cuts the middle out of
the message it raises and hands the driver exceptions without their tracebacks."""

from __future__ import annotations

import pytest
from ray.train import ControllerError, WorkerGroupError

from twinflow.train.failures import errors_log, train_loop_keeping_traceback, write_failure_log


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_the_driver_keeps_each_ranks_whole_message(tmp_path):
    cause = "the shard s3://b/part-7.parquet could not be read: " + "detail " * 400 + "THE-END"
    exc = WorkerGroupError("cut short ...", {1: _raised(OSError(cause)), 0: _raised(ValueError("rank zero"))})
    path = write_failure_log(tmp_path, exc)
    text = path.read_text()
    assert path == tmp_path / "logs" / "errors.log"
    assert text.index("=== rank 0 (as the driver received it): ValueError") < text.index("=== rank 1")
    assert cause in text  # nothing cut, the end included


def test_a_controller_failure_is_kept_and_nothing_is_written_without_errors(tmp_path):
    path = write_failure_log(tmp_path, ControllerError(_raised(RuntimeError("no placement group"))))
    assert "=== controller (as the driver received it): RuntimeError" in path.read_text()
    assert write_failure_log(tmp_path / "other", RuntimeError("not a Ray Train error")) is None
    assert not (tmp_path / "other").exists()


def test_the_worker_writes_its_own_traceback_before_the_error_leaves_it(tmp_path, monkeypatch):
    import ray.train

    import twinflow.train.worker as worker

    def deep_inside(config):
        raise KeyError("optimizer state for param group 3")

    class Context:
        def get_world_rank(self):
            return 1

    monkeypatch.setattr(worker, "train_loop", deep_inside)
    monkeypatch.setattr(ray.train, "get_context", Context)
    with pytest.raises(KeyError):
        train_loop_keeping_traceback({"run_dir": str(tmp_path)})
    text = errors_log(tmp_path).read_text()
    assert text.startswith("=== rank 1 (worker traceback)\nTraceback (most recent call last)")
    assert "in deep_inside" in text and "optimizer state for param group 3" in text
