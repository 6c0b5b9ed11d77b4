"""The builtin evaluation (pixel-PCA Fréchet distance, nearest-centroid adherence) and the sweep report,
without Ray: real Fashion-MNIST images stand in for a perfect generator, noise for a broken one."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from twinflow.method.config import TwinFlowConfig
from twinflow.tune import evaluation as ev
from twinflow.tune.config import EvalSetting, EvaluationConfig, load_sweep

REPO = Path(__file__).resolve().parents[2]


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    b = rng.normal(size=(20000, 4))
    assert ev.frechet_distance(a, b) < 0.01
    shifted = b + np.array([3.0, 0, 0, 0])
    assert ev.frechet_distance(a, shifted) == pytest.approx(9.0, abs=0.1)
    scaled = b * 2.0  # same mean, sd 2: 4 dims x (1 + 4 - 2*2) = 4
    assert ev.frechet_distance(a, scaled) == pytest.approx(4.0, abs=0.15)


@pytest.fixture(scope="module")
def fashion_eval(tmp_path_factory):
    """600 Fashion-MNIST eval records, 200 train ones (the floor's real sample; built once per module)."""
    from twinflow.data import build_pipeline, load_pipeline

    out = tmp_path_factory.mktemp("fashion_eval") / "shards"
    cfg = load_pipeline(
        REPO / "pipelines" / "fashion_mnist.yaml",
        [f"output={out}", "shard_size=600", "splits.train.count=200", "splits.eval.count=600"],
    )
    build_pipeline(cfg, progress=False)
    return out


def _job(shards: Path):
    from twinflow.train.config import load_job

    return load_job(REPO / "jobs" / "fashion_twinflow.yaml", [f"data.path={shards}", "train.init_from=null"])


def test_builtin_scores_real_images_as_real_and_noise_as_noise(fashion_eval, monkeypatch):
    """The judge-free evaluator: pixel-PCA Fréchet distance and nearest-centroid adherence."""
    job = _job(fashion_eval)
    evaluation = EvaluationConfig(evaluator="builtin", nfe=[1], samples=200, reference=400, pca_dim=32)
    ref = ev.reference_for(job, evaluation)
    assert len(ref.held_images) == 200 and ref.classes is not None and len(ref.classes) == 10
    mode = {}

    def fake_generate(model, captions, setting, **kw):
        n = len(captions)
        if mode["kind"] == "real":  # a perfect generator: held-out real images of the asked class
            return torch.from_numpy(ref.held_images[:n])
        if mode["kind"] == "wrong_class":  # real images, but each of another class than asked
            return torch.from_numpy(ref.held_images[_other_class(ref.held_labels)][:n])
        return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(0)) * 2 - 1

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "_encoder", lambda job: None)
    out = {}
    for kind in ("real", "wrong_class", "noise"):
        mode["kind"] = kind
        out[kind] = ev.builtin(
            None,
            job=job,
            evaluation=evaluation,
            settings=[EvalSetting(1, "few", 1.0)],
            device=torch.device("cpu"),
        )
    real, wrong, noise = out["real"], out["wrong_class"], out["noise"]
    assert real["eval/pcafd_nfe1"] == pytest.approx(
        real["eval/pcafd_floor"]
    )  # held-out real images are the floor
    assert (
        real["eval/pcaadh_nfe1"] == pytest.approx(real["eval/pcaadh_floor"])
        and real["eval/pcaadh_nfe1"] > 0.5
    )
    assert noise["eval/pcafd_nfe1"] > 5 * real["eval/pcafd_nfe1"]
    assert wrong["eval/pcaadh_nfe1"] < 0.3  # realistic images of the wrong class: adherence drops


def test_judged_evaluator_uses_the_judges(fashion_eval, monkeypatch):
    """twinflow.eval's judges at each eval setting: real images of the prompted class score near the
    floor with high adherence; noise scores far worse; the preset setting goes through `sample` with the
    preset's settings and a non-preset one with its own style/rho."""
    from twinflow.eval.datasets import load_split
    from twinflow.method import sampler as method_sampler

    job = _job(fashion_eval)
    evaluation = EvaluationConfig(nfe=[1, 2], style=["few", "any"], rho=[1.0], samples=200, batch_size=64)
    real = load_split("fashion_mnist", "heldout")
    by_class = {c: np.flatnonzero(real.labels == c) for c in range(10)}
    per_class = 20  # 200 samples over 10 classes, class-major rows
    seen, mode, pos = [], {}, {"row": 0}

    def fake_sample(model, noise, cond, *, settings, generator=None, **kw):
        seen.append((settings.nfe, settings.style, settings.rho))
        n = noise.shape[0]
        rows = [(pos["row"] + i) % (10 * per_class) for i in range(n)]
        pos["row"] += n
        if mode["kind"] == "noise":
            return torch.rand(noise.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
        idx = [by_class[r // per_class][(r % per_class) + 100] for r in rows]
        return torch.as_tensor(real.as_float(np.array(idx))).float().reshape(n, 1, 28, 28)

    monkeypatch.setattr(method_sampler, "sample", fake_sample)
    model = SimpleNamespace(
        sample_shape=(1, 28, 28),
        parameters=lambda: iter([torch.zeros(1)]),
        training=False,
        eval=lambda: None,
        train=lambda mode=True: None,
    )
    out = {}
    for kind in ("real", "noise"):
        mode["kind"], pos["row"] = kind, 0
        out[kind] = ev.judged(
            model, job=job, evaluation=evaluation, settings=evaluation.settings(), device=torch.device("cpu")
        )
    assert set(out["real"]) == evaluation.metric_names()
    assert (2, "any", 1.0) in seen and (1, "few", 1.0) in seen
    r, n = out["real"], out["noise"]
    assert r["eval/fd_nfe1"] < 3 * r["eval/fd_floor"] + 1 and r["eval/adherence_nfe1"] > 0.8
    assert r["eval/diversity_nfe1"] > 0.7 and r["eval/collapse_nfe1"] == 0
    assert n["eval/fd_nfe1"] > 10 * r["eval/fd_nfe1"] and n["eval/adherence_nfe1"] < 0.5


def _other_class(labels: np.ndarray) -> np.ndarray:
    """For each position i, the index of an image whose label differs from labels[i]."""
    idx = []
    for i, lab in enumerate(labels):
        j = (i + 1) % len(labels)
        while labels[j] == lab:
            j = (j + 1) % len(labels)
        idx.append(j)
    return np.array(idx)


def test_generate_uses_common_random_numbers():
    """The noise depends on the seed only (not on the batch size or the setting): settings and trials
    are compared on the same draws."""
    seen = []

    class Model(torch.nn.Module):
        sample_shape = (1, 4, 4)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, r, cond):
            seen.append(x.clone())
            return torch.zeros_like(x)  # zero velocity: 1 NFE returns the initial noise itself

    enc = SimpleNamespace(
        encode=lambda caps: {
            "text_states": torch.zeros(len(caps), 2, 3),
            "text_mask": torch.ones(len(caps), 2, dtype=torch.int64),
        }
    )
    kw = dict(job=SimpleNamespace(method=TwinFlowConfig()), seed=3, device=torch.device("cpu"), encoder=enc)
    a = ev.generate(Model(), ["x"] * 5, EvalSetting(1, "few", 1.0), batch_size=2, **kw)
    b = ev.generate(Model(), ["x"] * 5, EvalSetting(1, "few", 1.0), batch_size=4, **kw)
    noise = torch.randn((5, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(seen[:3]), noise)  # batches 2 + 2 + 1 see the seed's noise in order
    assert torch.equal(a, b) and torch.equal(a, noise.clamp(-1, 1))
    ev.generate(Model(), ["x"] * 5, EvalSetting(2, "few", 1.0), batch_size=5, **kw)
    assert torch.equal(seen[-2], noise)  # 2 NFE starts from the same noise


# ---- report -------------------------------------------------------------------------------------
def _sweep(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(
        f"name: rep\nbase_job: {REPO / 'jobs' / 'fashion_twinflow.yaml'}\n"
        "search_space:\n  method.lambda: {grid: [0.0, 0.33, 0.5]}\n"
        f"evaluation: {{nfe: [1, 2]}}\nstorage: {tmp_path / 'st'}\n"
    )
    return load_sweep(p)


def _result(trial_id, lam, metrics, error=None):
    base = {"trial_id": trial_id, "step": 300, "total": 0.5}
    return SimpleNamespace(
        config={"method.lambda": lam}, metrics={**base, **metrics}, error=error, path=f"/x/{trial_id}"
    )


def test_report_table_plot_and_best(tmp_path):
    from twinflow.tune.report import write_report

    sweep = _sweep(tmp_path)
    results = [
        _result(
            "t2",
            0.5,
            {
                "evaluated": 1,
                "eval/fd_nfe1": 30.0,
                "eval/fd_nfe2": 25.0,
                "eval/fd_floor": 5.0,
                "eval/adherence_nfe1": 0.7,
                "eval/adherence_nfe2": 0.75,
                "train_s": 60.0,
            },
        ),
        _result(
            "t0",
            0.0,
            {
                "evaluated": 1,
                "eval/fd_nfe1": 40.0,
                "eval/fd_nfe2": 20.0,
                "eval/fd_floor": 5.0,
                "eval/adherence_nfe1": 0.6,
                "eval/adherence_nfe2": 0.8,
                "train_s": 61.0,
            },
        ),
        _result("t1", 0.33, {"step": 100, "done": True}),  # stopped early by the scheduler: no evaluation
    ]
    # the best trial's run dir holds an export and its grid
    from twinflow.tune.report import sweep_trials_dir

    t2 = Path(sweep_trials_dir(sweep)) / "rep-t2"
    (t2 / "export").mkdir(parents=True)
    (t2 / "export" / "twinflow.json").write_text(json.dumps({"format_version": 1, "method": "twinflow"}))
    (t2 / "eval_samples.png").write_bytes(b"png")
    out = write_report(sweep, results, tmp_path / "report")
    md = (tmp_path / "report" / "results.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0] == (
        "| trial | method.lambda | status | loss | FD 1 NFE | FD 2 NFE | adh. 1 NFE | adh. 2 NFE "
        "| div. 1 NFE | div. 2 NFE | train s |"
    )
    assert [line.split(" | ")[1] for line in lines[1:]] == ["0", "0.33", "0.5"]  # sorted by the plot axis
    assert "| stopped at step 100 |" in md and "**t2**" in md and "FD of real images" in md
    rows = list(csv.DictReader((tmp_path / "report" / "results.csv").open()))
    assert len(rows) == 3 * 2 and {r["status"] for r in rows} == {"finished", "stopped at step 100"}
    assert out.best["trial_id"] == "t2" and out.best["value"] == 30.0
    meta = json.loads((tmp_path / "report" / "best" / "export" / "twinflow.json").read_text())
    assert meta["sweep"] == {
        "name": "rep",
        "trial_id": "t2",
        "params": {"method.lambda": 0.5},
        "metric": "eval/fd_nfe1",
        "value": 30.0,
    }
    assert (tmp_path / "report" / "best" / "samples.png").read_bytes() == b"png"
    assert (tmp_path / "report" / "fd_vs_method_lambda.png").stat().st_size > 5000


def test_report_without_finished_trials_has_no_best(tmp_path):
    from twinflow.tune.report import write_report

    sweep = _sweep(tmp_path)
    out = write_report(
        sweep,
        [
            _result("t0", 0.0, {}, error=RuntimeError("boom")),
            _result("t1", 0.5, {"step": 150}),
        ],  # interrupted: resuming continues it
        tmp_path / "report",
    )
    assert out.best is None and not (tmp_path / "report" / "best.json").exists()
    md = (tmp_path / "report" / "results.md").read_text()
    assert "| errored |" in md and "| unfinished at step 150 |" in md
