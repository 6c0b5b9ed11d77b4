from __future__ import annotations

import pytest
from plan_jobs import no_weights, plan_job


@pytest.fixture
def weightless_job(tmp_path):
    """`weightless_job(path, *sets)`: the job with its model files pointed at an empty directory."""
    return lambda path, *sets: plan_job(path, *no_weights(tmp_path), *sets)
