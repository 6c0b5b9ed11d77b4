"""Driver processes for the reliability tests that need their own Ray (started the way `twinflow train`
starts it, or joining `--address=<GCS address>`) or that get killed:
`python drive_job.py <shards> <out dir> <name> [FIELD=VALUE ...] [--address=ADDRESS]`.

Prints `SESSION <ray session dir>` once Ray is up, then the job's JobResult as JSON."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import ray
    from helpers import make_job  # this script's folder is first on sys.path

    from twinflow.train.launcher import ensure_ray, run_job

    shards, out, name, *extra = argv
    address = next((a.split("=", 1)[1] for a in extra if a.startswith("--address=")), None)
    job = make_job(shards, out, name, *(a for a in extra if not a.startswith("--address=")))
    ensure_ray(job, address)
    print("SESSION", ray._private.worker._global_node.get_session_dir_path(), flush=True)
    result = run_job(job, address=address)
    print(result.to_json(), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
