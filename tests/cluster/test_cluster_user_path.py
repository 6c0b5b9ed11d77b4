"""The cluster user's path (issue 17), as docs/cluster.md writes it: `ray start --head` (dashboard,
token auth as Ray 2.60 sets it up), `ray job submit` of the shipped job YAML and of a sweep, then
`serve deploy` of a Serve config, all against that one running cluster. Every command is the user's,
run as a subprocess; only the sizes (`--set`) are cut down.

The cluster runs in its own temp dir on free ports, beside the session's Ray. It is started with
`--block` and ended by killing that process's tree: `ray stop` would stop every Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the cluster's environment: twinflow, ray, serve on PATH
RUNTIME_ENV = '{"py_modules": ["platform/twinflow"]}'  # our package travels with the job (docs/cluster.md)
TINY = [  # a few steps on the session's small shards, one worker, one grid image per prompt
    "train.steps=2",
    "train.micro_batch=8",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "cluster.num_workers=1",
    "data.shuffle_buffer=32",
    "eval.nfe=[1]",
    "eval.images_per_prompt=1",
    "eval.metrics=false",
    "output.tensorboard=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_env(dashboard: str) -> dict[str, str]:
    """A user's shell: the environment on PATH, token auth on, RAY_ADDRESS = the dashboard (job CLI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TWINFLOW_SERVE"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_ADDRESS=dashboard)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` with the dashboard on 127.0.0.1, in a short temp dir (socket paths)."""
    temp = Path(tmp_path_factory.mktemp("rh"))
    ports = {name: _free_port() for name in ("gcs", "dash", "client", "nm", "om", "ag", "agg", "me", "re")}
    dashboard = f"http://127.0.0.1:{ports['dash']}"
    env = _user_env(dashboard)
    env.pop("RAY_ADDRESS")
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=4",
        f"--temp-dir={temp / 'ray'}",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dash']}",
        f"--ray-client-server-port={ports['client']}",
        f"--node-manager-port={ports['nm']}",
        f"--object-manager-port={ports['om']}",
        f"--dashboard-agent-listen-port={ports['ag']}",
        f"--dashboard-agent-grpc-port={ports['agg']}",
        f"--metrics-export-port={ports['me']}",
        f"--runtime-env-agent-port={ports['re']}",
        "--disable-usage-stats",
    ]
    log_path = temp / "head.log"
    for attempt in range(2):  # a loaded machine can time out the first start ("Deadline Exceeded")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.time() + 120
        while "Ray runtime started" not in log_path.read_text() and proc.poll() is None:
            assert time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        if proc.poll() is None:
            break
        assert attempt == 0, log_path.read_text()[-3000:]
        _kill_group(proc.pid)  # whatever the failed start left behind
    try:
        yield {"dashboard": dashboard, "env": _user_env(dashboard), "temp": temp}
    finally:
        _end_cluster(proc)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _descendants(root: int) -> set[int]:
    """`root` and every live process below it (GCS, raylet, dashboard, Serve's and jobs' workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) if d.name.isdigit() else None
        except (OSError, IndexError, ValueError):
            continue
        if ppid is not None:
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def _end_cluster(proc: subprocess.Popen) -> None:
    """Kill the test cluster's whole process tree at once. SIGTERM to `ray start --block` ends it
    gracefully, process by process, in ~30 s; nothing of this throwaway cluster needs that."""
    if proc.poll() is not None:  # already gone (and reaped: its pid may be another process's now)
        _kill_group(proc.pid)
        return
    stopped: set[int] = set()
    while pids := _descendants(proc.pid) - stopped:  # frozen first, so nothing forks or restarts
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= pids
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _kill_group(proc.pid)
    proc.wait(timeout=60)


def submit(head: dict, name: str, *entrypoint: str) -> str:
    """`ray job submit --no-wait` with the repo as working dir and our package as a py_module."""
    _run(
        [
            "ray",
            "job",
            "submit",
            f"--submission-id={name}",
            "--working-dir=.",
            f"--runtime-env-json={RUNTIME_ENV}",
            "--no-wait",
            "--",
            *entrypoint,
        ],
        head["env"],
    )
    return name


def wait_job(head: dict, job_id: str, timeout: float = 400) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; its final state and `ray job logs`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _run(["ray", "job", "status", "--log-style=record", job_id], head["env"])
        # running: "Status for job 'x': RUNNING"; ended: "Job 'x' succeeded" (or failed, stopped)
        found = re.search(r"Job '[^']+' (succeeded|failed|stopped)", status)
        if found:
            state = found.group(1).upper()
            return state, _run(["ray", "job", "logs", job_id], head["env"])
        time.sleep(2)
    raise AssertionError(f"{job_id} still running after {timeout} s")


def test_a_user_trains_sweeps_and_serves_on_a_running_cluster(head, fashion_small, tmp_path):
    from twinflow.models.export import load_generator

    out = tmp_path / "shared"  # the shared storage every node sees (here: one machine)
    t0 = time.perf_counter()
    # a relative data.path is not in the working-dir upload: the job says so before any worker starts
    bad = submit(
        head, "relative-data", "twinflow", "train", "jobs/fashion_base_fm.yaml", *[f"--set={s}" for s in TINY]
    )
    train = submit(
        head,
        "base-fm",
        "twinflow",
        "train",
        "jobs/fashion_base_fm.yaml",
        f"--set=data.path={fashion_small}",
        f"--set=output.dir={out}",
        *[f"--set={s}" for s in TINY],
    )
    state, logs = wait_job(head, bad)
    assert state == "FAILED"
    assert "data.path: 'data/fashion_mnist' is not in that copy" in logs and "--set data.path=" in logs
    assert "RayTrainWorker" not in logs and "Connecting to existing Ray cluster" not in logs

    state, logs = wait_job(head, train)
    assert state == "SUCCEEDED", logs[-4000:]
    assert "job fashion_base_fm FINISHED at step 2/2" in logs
    base_export = out / "fashion_base_fm" / "export"
    model, meta = load_generator(base_export)
    assert meta["method"] == "flow_matching" and sum(p.numel() for p in model.parameters()) > 0
    t_train = time.perf_counter() - t0

    # the shipped sweep, one lambda, fine-tuning the export the job above wrote
    sweep = submit(
        head,
        "sweep",
        "twinflow",
        "tune",
        "tune/fashion_lambda_nfe.yaml",
        f"--set=storage={out / 'tune'}",
        "--set=search_space={method.lambda: {grid: [0.33]}}",
        "--set=evaluation={nfe: [1], samples: 16, reference: 16, grid_images_per_prompt: 1}",
        f"--job-set=train.init_from={base_export}",
        f"--job-set=data.path={fashion_small}",
        f"--job-set=data.embed_cache_path={out / 'embeddings'}",
        *[f"--job-set={s}" for s in TINY],
    )
    state, logs = wait_job(head, sweep)
    assert state == "SUCCEEDED", logs[-4000:]
    twin_export = next((out / "tune" / "fashion_lambda_nfe" / "trials").glob("*/export"))
    model, meta = load_generator(twin_export)
    assert meta["method"] == "twinflow"
    t_sweep = time.perf_counter() - t0 - t_train

    # serve deploy: the shipped Serve config with the exports at their shared paths and a free port
    config = yaml.safe_load((REPO / "serve" / "fashion_demo.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    paths = {"fashion-twinflow": twin_export, "fashion-base-fm": base_export}
    for m in config["applications"][0]["args"]["models"]:
        m["path"] = str(paths[m["id"]])
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _run(["serve", "deploy", str(tmp_path / "serve.yaml"), "-a", head["dashboard"]], head["env"])
    deadline = time.time() + 180
    running = re.compile(r"twinflow:\n\s+status: RUNNING")  # the application, not just a replica
    while not running.search(status := _run(["serve", "status", "-a", head["dashboard"]], head["env"])):
        assert "DEPLOY_FAILED" not in status and time.time() < deadline, status
        time.sleep(2)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/generate",
        data=json.dumps({"prompt": "a photo of a bag", "nfe": 1, "seed": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        body = json.loads(resp.read())
    assert body["model"] == "fashion-twinflow" and body["images"]
    t_serve = time.perf_counter() - t0 - t_train - t_sweep
    print(f"\ncluster path: train {t_train:.0f} s, sweep {t_sweep:.0f} s, serve {t_serve:.0f} s")
