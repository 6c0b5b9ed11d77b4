"""A failed job keeps every rank's full traceback (Ray cuts the middle out of the message it raises)."""

from __future__ import annotations

from ray.train import ControllerError, WorkerGroupError

from twinflow.train.launcher import write_failure_log


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_each_ranks_full_error_is_kept(tmp_path):
    cause = "the shard s3://b/part-7.parquet could not be read: " + "detail " * 400 + "THE-END"
    exc = WorkerGroupError("cut short ...", {1: _raised(OSError(cause)), 0: _raised(ValueError("rank zero"))})
    path = write_failure_log(tmp_path, exc)
    text = path.read_text()
    assert path == tmp_path / "logs" / "errors.log"
    assert text.index("=== rank 0: ValueError") < text.index("=== rank 1: OSError")
    assert cause in text  # nothing cut, the end included
    assert "Traceback (most recent call last)" in text and "_raised" in text


def test_a_controller_failure_is_kept_and_nothing_is_written_without_errors(tmp_path):
    path = write_failure_log(tmp_path, ControllerError(_raised(RuntimeError("no placement group"))))
    assert "=== controller: RuntimeError" in path.read_text()
    assert write_failure_log(tmp_path / "other", RuntimeError("not a Ray Train error")) is None
    assert not (tmp_path / "other").exists()
