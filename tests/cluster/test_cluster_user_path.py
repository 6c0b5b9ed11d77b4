"""The cluster user's path, as docs/cluster.md writes it: `ray start --head` (dashboard, token auth as
Ray 2.60 sets it up), `ray job submit` of EVERY shipped job YAML (periodic evaluation on) and of every
shipped sweep (one trial), then `serve deploy` of a Serve config, all against that one running
cluster. Every command is the user's, run as a subprocess; only the sizes (`--set`) are cut down.
The nodes hold nothing but the environment: the jobs get their shards and outputs as absolute shared
paths, and the eval reference cache starts empty, as on a fresh node, so a job that reads anything
else (a raw source folder beside the code) fails here.

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

from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3600)]

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
    "output.tensorboard=false",
]
# Periodic evaluation stays on (the shipped default): judged at the last step, 2 images per prompt.
EVAL_ON = ["eval.every=2", "eval.metric_images_per_prompt=2"]

# Every shipped job: (its shards, the job whose export it fine-tunes), in the order they can run.
JOBS = {
    "mnist_base_fm": ("mnist", None),
    "fashion_base_fm": ("fashion", None),
    "mnist_edit_fm": ("edits", None),
    "mnist_twinflow": ("mnist", "mnist_base_fm"),
    "fashion_twinflow": ("fashion", "fashion_base_fm"),
    "mnist_edit_twinflow": ("edits", "mnist_edit_fm"),
    "qwen_image_lora": ("qwen", None),
    "qwen_image_full": ("qwen", None),
}
# The 20B Qwen-Image recipes (LoRA and full), cut down: the tiny Qwen-Image pipeline of tests/models
# (its own VAE and Qwen2.5-VL encoder) and the latent cache of the Fashion shards instead of /mnt/models
# and S3, one CPU worker, 28 px; ZeRO-3, bf16, gradient checkpointing, micro_batch and the teacher as
# shipped (the LoRA rank cut to 4). Their sample grids are off to keep the run short (a latent job's
# grid is decoded by its VAE: tests/models/test_latent_grid.py); the judge metrics are off as shipped.
QWEN_SETS = [
    "cluster={num_workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}",
    "data.image_size=28",
    "data.text_max_length=16",
    "model.image_size=28",
    "model.text_max_length=16",
    "eval.prompts=[]",
]
QWEN_LORA = {"qwen_image_lora": ["model.lora.rank=4", "model.lora.alpha=4"]}
QWEN_CACHE = """
import sys
sys.path.insert(0, sys.argv[1])
import ray
from qwen_pipeline import build_tiny_pipeline
from twinflow.data.latent_cache import CacheSpec, build_latent_cache
pipe = build_tiny_pipeline(sys.argv[3] + "/pipe")
ray.init(address=sys.argv[5], log_to_driver=False)
build_latent_cache(sys.argv[2], CacheSpec(str(pipe), "qwen2.5-vl", str(pipe), 16, 28), sys.argv[4], actors=1, batch_size=32)
"""

# Every shipped sweep, one trial: (its shards, the job whose export it fine-tunes, its cut-down search and evaluation).
SWEEPS = {
    "fashion_lambda_nfe": (
        "fashion",
        "fashion_base_fm",
        [
            "search_space={method.lambda: {grid: [0.33]}}",
            "evaluation.nfe=[1]",
            "evaluation.samples=16",
            "evaluation.reference=16",
            "evaluation.grid_images_per_prompt=1",
        ],
    ),
    "mnist_edit_lambda": (
        "edits",
        "mnist_edit_fm",
        ["search_space={method.lambda: {grid: [0.333]}}", "evaluation.nfe=[2]", "evaluation.samples=8"],
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_env(dashboard: str) -> dict[str, str]:
    """A user's shell: the environment on PATH, token auth on, RAY_ADDRESS = the dashboard (job CLI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TWINFLOW_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_ADDRESS=dashboard)
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
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
    env["TWINFLOW_EVAL_CACHE"] = str(temp / "eval-cache")  # a fresh node: no real-reference features cached
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=6",
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
        wait_until(
            lambda p=proc: "Ray runtime started" in log_path.read_text() or p.poll() is not None,
            120,
            lambda: log_path.read_text()[-3000:],
        )
        if proc.poll() is None:
            break
        assert attempt == 0, log_path.read_text()[-3000:]
        _kill_group(proc.pid)  # whatever the failed start left behind
    try:
        gcs = f"127.0.0.1:{ports['gcs']}"
        yield {"dashboard": dashboard, "gcs": gcs, "env": _user_env(dashboard), "temp": temp}
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


def wait_job(head: dict, job_id: str, timeout: float = 900) -> tuple[str, str]:
    """Poll `ray job status` until the job ends; its final state and `ray job logs`."""

    def ended() -> str | None:
        status = _run(["ray", "job", "status", "--log-style=record", job_id], head["env"])
        # running: "Status for job 'x': RUNNING"; ended: "Job 'x' succeeded" (or failed, stopped)
        found = re.search(r"Job '[^']+' (succeeded|failed|stopped)", status)
        return found.group(1).upper() if found else None

    state = wait_until(ended, timeout, lambda: f"{job_id} still running", interval_s=2)
    return state, _run(["ray", "job", "logs", job_id], head["env"])


def _train(head: dict, job: str, data: Path, out: Path, init_from: Path | None, extra=()) -> str:
    sets = [f"data.path={data}", f"output.dir={out}", *TINY, *EVAL_ON, *extra]
    if init_from is not None:
        sets.append(f"train.init_from={init_from}")
    return submit(
        head, job.replace("_", "-"), "twinflow", "train", f"jobs/{job}.yaml", *[f"--set={s}" for s in sets]
    )


def _sweep(head: dict, sweep: str, data: Path, out: Path, init_from: Path, sets: list[str]) -> str:
    job_sets = [
        f"train.init_from={init_from}",
        f"data.path={data}",
        f"data.embed_cache_path={out / 'embeddings' / sweep}",
        *TINY,
    ]
    return submit(
        head,
        "sweep-" + sweep.replace("_", "-"),
        "twinflow",
        "tune",
        f"tune/{sweep}.yaml",
        f"--set=storage={out / 'tune'}",
        *[f"--set={s}" for s in sets],
        *[f"--job-set={s}" for s in job_sets],
    )


@pytest.fixture(scope="module")
def shipped(head, fashion_small, mnist_small, mnist_edits_small, tmp_path_factory):
    """Every shipped job and sweep submitted to the one cluster, in three waves (bases, their
    fine-tunes, the sweeps): {name: (final state, `ray job logs`, export folder)}, and each wave's time."""
    data = {"fashion": fashion_small, "mnist": mnist_small, "edits": mnist_edits_small}
    out = tmp_path_factory.mktemp("shared")  # the shared storage every node sees (here: one machine)
    results: dict[str, tuple[str, str, Path]] = {}
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    qwen = tmp_path_factory.mktemp("qwen")  # the pipeline and its latent cache, built beside the first wave
    cache = subprocess.Popen(
        [
            sys.executable,
            "-c",
            QWEN_CACHE,
            str(REPO / "tests" / "models"),
            str(fashion_small),
            str(qwen),
            str(qwen / "cache"),
            head["gcs"],
        ],
        env=head["env"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for wave in ("base", "fine-tune"):
        ids = {}
        for job, (shards, base) in JOBS.items():
            if shards == "qwen" and wave == "fine-tune":  # after the cache: with the fine-tunes
                if cache.returncode is None:
                    log, _ = cache.communicate(timeout=1200)
                    assert cache.returncode == 0, log[-3000:]
                sets = [
                    f"model.pretrained_path={qwen / 'pipe'}",
                    f"model.vae_path={qwen / 'pipe'}",
                    *QWEN_SETS,
                    *QWEN_LORA.get(job, []),
                ]
                ids[job] = _train(head, job, qwen / "cache", out, None, sets)
            elif shards != "qwen" and (base is None) == (wave == "base"):
                init = out / base / "export" if base else None
                ids[job] = _train(head, job, data[shards], out, init)
        for job, job_id in ids.items():
            state, logs = wait_job(head, job_id)
            results[job] = (state, logs, out / job / "export")
        times[wave] = time.perf_counter() - t0 - sum(times.values())
    ids = {
        sweep: _sweep(head, sweep, data[shards], out, out / base / "export", sets)
        for sweep, (shards, base, sets) in SWEEPS.items()
    }
    for sweep, job_id in ids.items():
        state, logs = wait_job(head, job_id)
        trials = sorted((out / "tune" / sweep / "trials").glob("*/export"))
        results[sweep] = (state, logs, trials[0] if trials else out / "tune" / sweep / "trials" / "none")
    times["sweeps"] = time.perf_counter() - t0 - sum(times.values())
    print("\ncluster path: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return {"results": results, "out": out, "times": times}


def test_every_shipped_job_and_sweep_is_covered():
    """Every jobs/*.yaml runs here; every tune/*.yaml but the Qwen-Image sweep, which needs what this
    machine cannot give it (an eval split of real images beside the latent cache for its builtin
    evaluator, ASHA rungs at step 1500, 8-GPU trials) and is validated in tests/tune instead."""
    assert sorted(JOBS) == sorted(p.stem for p in (REPO / "jobs").glob("*.yaml"))
    assert sorted(SWEEPS) == sorted(
        p.stem for p in (REPO / "tune").glob("*.yaml") if not p.stem.startswith("qwen_")
    )


@pytest.mark.parametrize("job", list(JOBS))
def test_a_shipped_job_runs_on_the_cluster_with_periodic_eval(shipped, job):
    from twinflow.models.export_loader import load_generator

    state, logs, export = shipped["results"][job]
    assert state == "SUCCEEDED", logs[-4000:]
    assert f"job {job} FINISHED at step 2/2" in logs
    model, meta = load_generator(export)
    assert meta["job"] == job and sum(p.numel() for p in model.parameters()) > 0
    if job in (
        "mnist_base_fm",
        "mnist_twinflow",
        "fashion_base_fm",
        "fashion_twinflow",
    ):  # judged while training
        assert re.search(r"eval fd_nfe1=\S+ adherence_nfe1=", logs), logs[-4000:]
    # quiet as the local CLI: our progress lines and results, not Ray's or DeepSpeed's own output
    assert "step 1/2" in logs
    for noise in ("Connecting to existing Ray cluster", "RayTrainWorker", "DeepSpeed", "[WARNING]"):
        assert noise not in logs, (noise, logs[-4000:])


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_a_shipped_sweep_runs_one_trial_on_the_cluster(shipped, sweep):
    from twinflow.models.export_loader import load_generator

    state, logs, export = shipped["results"][sweep]
    assert state == "SUCCEEDED", logs[-4000:]
    model, meta = load_generator(export)
    assert meta["method"] == "twinflow"
    assert (shipped["out"] / "tune" / sweep / "report" / "results.md").is_file()


def test_a_relative_path_fails_before_ray_and_the_exports_serve(head, shipped, tmp_path):
    # a relative data.path is not in the working-dir upload: the job says so before any worker starts
    t0 = time.perf_counter()
    bad = submit(
        head, "relative-data", "twinflow", "train", "jobs/fashion_base_fm.yaml", *[f"--set={s}" for s in TINY]
    )
    state, logs = wait_job(head, bad)
    assert state == "FAILED"
    assert "data.path: 'data/fashion_mnist' is not in that copy" in logs and "--set data.path=" in logs
    assert "RayTrainWorker" not in logs and "Connecting to existing Ray cluster" not in logs

    # serve deploy: the shipped Serve config with the exports at their shared paths and a free port
    base_export = shipped["results"]["fashion_base_fm"][2]
    twin_export = shipped["results"]["fashion_lambda_nfe"][2]
    config = yaml.safe_load((REPO / "serve" / "fashion_demo.yaml").read_text())
    port = _free_port()
    config["http_options"]["port"] = port
    paths = {"fashion-twinflow": twin_export, "fashion-base-fm": base_export}
    for m in config["applications"][0]["args"]["models"]:
        m["path"] = str(paths[m["id"]])
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _run(["serve", "deploy", str(tmp_path / "serve.yaml"), "-a", head["dashboard"]], head["env"])
    running = re.compile(r"twinflow:\n\s+status: RUNNING")  # the application, not just a replica
    last = {"status": ""}

    def deployed() -> bool:
        last["status"] = _run(["serve", "status", "-a", head["dashboard"]], head["env"])
        assert "DEPLOY_FAILED" not in last["status"], last["status"]
        return bool(running.search(last["status"]))

    wait_until(deployed, 180, lambda: last["status"], interval_s=2)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/generate",
        data=json.dumps({"prompt": "a photo of a bag", "nfe": 1, "seed": 3}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        body = json.loads(resp.read())
    assert body["model"] == "fashion-twinflow" and body["images"]
    print(f"\ncluster path: rejected job and serve {time.perf_counter() - t0:.0f} s")
