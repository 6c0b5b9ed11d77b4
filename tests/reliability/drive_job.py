"""Driver processes for the reliability tests that need their own Ray (started the way `twinflow train`
starts it) or that get killed: `python drive_job.py <shards> <out dir> <name> [FIELD=VALUE ...]`.

Prints `SESSION <ray session dir>` once Ray is up, then the job's JobResult as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.reliability.helpers`


def main(argv: list[str]) -> int:
    import ray

    from tests.reliability.helpers import make_job
    from twinflow.train.launcher import ensure_ray, run_job

    shards, out, name, *extra = argv
    job = make_job(shards, out, name, *extra)
    ensure_ray(job, None)
    print("SESSION", ray._private.worker._global_node.get_session_dir_path(), flush=True)
    result = run_job(job)
    print(result.to_json(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
