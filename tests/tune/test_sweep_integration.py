"""Real sweeps on the session's local Ray cluster: each trial a 1-worker Ray Train job (DeepSpeed, gloo)
on 96 Fashion-MNIST records, 4 steps, evaluated at 1 and 2 NFE on 16 samples."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from ray.tune import Callback
from sweep_files import STEPS, make_sweep  # tests/tune, first on sys.path for its own tests

from twinflow.tune.config import load_sweep
from twinflow.tune.runner import local_sweep_dir, run_sweep

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory):
    """The sweeps' shared text-embedding cache (built by the first sweep's driver, reused after)."""
    return tmp_path_factory.mktemp("embed_cache")


def by_param(result, key: str) -> dict:
    return {r[key]: r for r in result.rows if r["nfe"] == 1}


class SignalAfterResult(Callback):
    """Tune callback: once (ever, a marker file says so) send SIGUSR1 to the driver when `param` of a
    trial equals `value` and it reported `step` >= `at_step`: Tune's own Ctrl-C path (save state, stop)."""

    def __init__(self, param: str, value, at_step: int, marker: Path):
        self.param, self.value, self.at_step, self.marker = param, value, at_step, str(marker)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (
            trial.config.get(self.param) == self.value
            and result.get("step", 0) >= self.at_step
            and not os.path.exists(self.marker)
        ):
            Path(self.marker).write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.timeout(900)
def test_two_trial_sweep_end_to_end_interrupted_and_resumed(
    ray_cluster, fashion_small, embed_cache, tmp_path
):
    """A 2-trial lambda sweep, interrupted (SIGUSR1: Tune's Ctrl-C path) while trial B trains, then run
    again: finished trial A is not rerun, B continues from its Ray Train checkpoint, and the outputs
    (table over trials x NFE, lambda plot, best trial's samples and export) are complete."""
    path = make_sweep(
        tmp_path,
        fashion_small,
        "e2e",
        {"method.lambda": {"grid": [0.0, 0.5]}},
        overrides={"train.steps": 6},
        cache=embed_cache,
    )
    sweep = load_sweep(path)
    marker = tmp_path / "interrupted"
    first = run_sweep(sweep, extra_callbacks=[SignalAfterResult("method.lambda", 0.5, 2, marker)])
    assert marker.exists() and not first.resumed
    b_id = marker.read_text()
    status = {lam: r["status"] for lam, r in by_param(first, "method.lambda").items()}
    assert status[0.0] == "finished" and status[0.5].startswith("unfinished at step")
    trials = local_sweep_dir(sweep) / "trials"
    a_dir = next(p for p in trials.iterdir() if not p.name.endswith(b_id))
    b_log = trials / f"e2e-{b_id}" / "logs" / "metrics.jsonl"
    a_export_mtime = (a_dir / "export" / "twinflow.json").stat().st_mtime
    b_rows_before = {json.loads(x)["step"]: x for x in b_log.read_text().splitlines()}
    assert 2 in b_rows_before

    # ---- resume: the sweep dir exists, so the same command restores it ----
    result = run_sweep(load_sweep(path))
    assert result.resumed
    rows = by_param(result, "method.lambda")
    assert rows[0.0]["status"] == rows[0.5]["status"] == "finished" and rows[0.5]["step"] == 6
    assert (a_dir / "export" / "twinflow.json").stat().st_mtime == a_export_mtime  # A was not retrained
    b_rows_after = {json.loads(x)["step"]: x for x in b_log.read_text().splitlines()}
    assert sorted(b_rows_after) == [1, 2, 3, 4, 5, 6]  # every step logged once
    # B's rows up to its checkpoint are the first attempt's, byte for byte (timings included): it
    # resumed from the step-2 (or later) checkpoint instead of training again from step 0
    assert b_rows_after[1] == b_rows_before[1] and b_rows_after[2] == b_rows_before[2]

    # ---- outputs ----
    report = Path(result.report_dir)
    table = list(csv.DictReader((report / "results.csv").open()))
    assert sorted((float(r["method.lambda"]), int(r["nfe"])) for r in table) == [
        (0.0, 1),
        (0.0, 2),
        (0.5, 1),
        (0.5, 2),
    ]
    assert {r["status"] for r in table} == {"finished"}
    fd = [float(r["fd"]) for r in table]
    # a 6-step model from random init is far from real images; held-out real images are not
    assert all(v > 0 for v in fd) and float(table[0]["fd_floor"]) < min(fd)
    md = (report / "results.md").read_text()
    assert (
        "| trial | method.lambda | status | loss | FD 1 NFE | FD 2 NFE |" in md
        and md.count("| finished |") == 2
    )
    assert (report / "fd_vs_method_lambda.png").stat().st_size > 5000

    # one Ray Train run per trial, named <sweep>-<trial id>, under the sweep's storage
    runs = sorted(p.name for p in trials.iterdir())
    assert len(runs) == 2 and all(r.startswith("e2e-") for r in runs)
    for r in runs:
        trial = json.loads((trials / r / "trial.json").read_text())
        assert r == f"e2e-{trial['trial_id']}" and trial["metrics"]["evaluated"] == 1
        job = json.loads((trials / r / "job.json").read_text())
        assert job["name"] == r and job["method"]["lambda"] == trial["params"]["method.lambda"]

    # the best trial's sample grid and export, loadable as is (what `twinflow serve` takes)
    best = json.loads((report / "best.json").read_text())
    assert best["value"] == min(float(r["fd"]) for r in table if r["nfe"] == "1")
    assert (report / "best" / "samples.png").stat().st_size > 0
    from twinflow.models.export_loader import load_generator

    gen, meta = load_generator(report / "best" / "export")
    assert meta["method"] == "twinflow" and meta["sweep"]["trial_id"] == best["trial_id"]
    assert meta["sweep"]["params"]["method.lambda"] == best["params"]["method.lambda"]


# TWINFLOW_TUNE_REPRODUCE_54305=1 runs the early-stopping test with the guard off and fails it on purpose
# once the bug shows: the stopped trial's placement group still holds its CPUs while trial 3 gets nowhere.
REPRODUCE_54305 = os.environ.get("TWINFLOW_TUNE_REPRODUCE_54305") == "1"
LEAK_WAIT_S = 120


class WatchForLeak(Callback):
    """Repro mode: when trial 3 starts, watch the stopped trial's recorded placement group; if it is still
    CREATED and trial 3 has reported nothing after LEAK_WAIT_S, note it and interrupt the sweep."""

    def __init__(self, registry: str, out: Path):
        self.registry, self.out, self.started = registry, str(out), []

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.append(trial.trial_id)
        if len(self.started) == 3:
            import threading

            threading.Thread(target=self._watch, args=(self.started[1], trial), daemon=True).start()

    def _watch(self, stopped_id, trial3):
        import ray
        from ray.util.placement_group import placement_group_table

        from twinflow.tune.pg_guard import _pg, get_registry

        t0, lines = time.monotonic(), []
        while time.monotonic() - t0 < LEAK_WAIT_S:
            time.sleep(5)
            pgs = ray.get(get_registry(self.registry).pgs.remote(stopped_id))
            states = {h: placement_group_table(_pg(h))["state"] for h in pgs}
            step = trial3.last_result.get("step")  # None until trial 3 reports a training step
            lines.append(
                f"{time.monotonic() - t0:5.0f} s: stopped trial's groups {states}; trial 3 at step "
                f"{step}; free CPUs {ray.available_resources().get('CPU', 0):.2f}"
            )
            if step is not None:
                break
        Path(self.out).write_text("\n".join(lines) + "\n")
        if trial3.last_result.get("step") is None:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.timeout(600)
def test_early_stopped_trial_does_not_hang_the_next(ray_cluster, fashion_small, embed_cache, tmp_path):
    """ray#54305: ASHA stops trial 2 at its first rung; its Ray Train placement group (2 of the 4 CPUs)
    must be released, or trial 3 (which needs them) waits forever. pytest-timeout bounds the wait."""
    import ray
    from ray.util.placement_group import placement_group_table

    from twinflow.tune.pg_guard import get_registry, registry_name

    # model_calls per step: 4 at rollout_order 2, 5 at 3 (online teacher): trial 2 is worse at step 2
    path = make_sweep(
        tmp_path,
        fashion_small,
        "asha",
        {"method.rollout_order": {"grid": [2, 3, 2]}},
        overrides={"cluster.cpus_per_worker": 2},
        cache=embed_cache,
        metric="model_calls",
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2},
        release_placement_groups=not REPRODUCE_54305,
    )
    sweep = load_sweep(path)
    watch = [WatchForLeak(registry_name("asha"), tmp_path / "leak.txt")] if REPRODUCE_54305 else []
    t0 = time.monotonic()
    result = run_sweep(sweep, extra_callbacks=watch)
    took = time.monotonic() - t0
    trials = [t for t in sorted(result.rows, key=lambda r: r["trial_id"]) if t["nfe"] == 1]
    if REPRODUCE_54305:
        log = (tmp_path / "leak.txt").read_text() if (tmp_path / "leak.txt").exists() else "(no watch log)"
        print(log)
        pytest.fail(f"guard off: trial statuses {[t['status'] for t in trials]}; watch log:\n{log}")
    assert [t["method.rollout_order"] for t in trials] == [2, 3, 2]
    assert [t["status"] for t in trials] == ["finished", "stopped at step 2", "finished"]
    assert trials[1]["step"] == 2 and trials[2]["step"] == STEPS

    # the guard found the stopped trial's Train run and its placement group is gone
    log = {e["trial_id"]: e for e in ray.get(get_registry(registry_name("asha")).released.remote())}
    stopped = log[trials[1]["trial_id"]]
    assert stopped["pgs"], "the stopped trial's placement group was never recorded"
    for pg_hex in stopped["pgs"]:
        assert placement_group_table(_pg(pg_hex))["state"] == "REMOVED"
    assert ray.available_resources().get("CPU", 0) >= 4 - 0.5  # nothing left reserved (bar stragglers)
    print(f"3 trials, one stopped early, in {took:.0f} s; guard log for the stopped trial: {stopped}")


def _pg(pg_hex: str):
    from twinflow.tune.pg_guard import _pg as pg

    return pg(pg_hex)
