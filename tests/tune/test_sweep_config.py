"""The sweep YAML model: shipped sweeps validate; bad files fail naming the file and field; search
spaces convert to Ray Tune; trial jobs are built from the base job with their own name and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.tune.config import EvalSetting, load_sweep, trial_job

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "tune").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = """
name: s
base_job: {job}
search_space:
  method.lambda: {{grid: [0.0, 0.5]}}
"""


def sweep_file(tmp_path, extra: str = "", job: str | None = None) -> Path:
    return write(tmp_path, BASE.format(job=job or REPO / "jobs" / "fashion_twinflow.yaml") + extra)


def test_shipped_sweeps_exist():
    names = {p.name for p in SWEEPS}
    assert "fashion_lambda_nfe.yaml" in names and "qwen_image_lambda_nfe.yaml" in names


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_shipped_sweep_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path.relative_to(REPO))
    assert path.read_text().startswith(f"# twinflow tune tune/{path.name}\n")
    assert sweep.config.name == path.stem
    job = sweep.base_job()  # the base job with the sweep's overrides is a valid JobConfig
    assert job.method.name == "twinflow"
    assert sweep.config.param_space()  # converts to Ray Tune domains


def test_small_sweep_is_lambda_by_nfe_on_one_worker(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep("tune/fashion_lambda_nfe.yaml")
    cfg = sweep.config
    assert list(cfg.search_space) == ["method.lambda"] and cfg.search_space["method.lambda"].grid_size >= 4
    assert cfg.evaluation.nfe == [1, 2, 4] and cfg.metric == "eval/fd_nfe1"
    assert (
        cfg.evaluation.evaluator == "twinflow.eval" and "eval/diversity_nfe1" in cfg.evaluation.metric_names()
    )
    assert sweep.base_job().cluster.num_workers == 1 and cfg.max_concurrent_trials == 1


def test_qwen_sweep_targets_the_qwen_image_backbone(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep("tune/qwen_image_lambda_nfe.yaml")
    job = sweep.base_job()
    assert job.model.family == "qwen_image" and job.model.pretrained_path and job.model.vae_path
    assert job.cluster.use_gpu and job.cluster.num_workers >= 8
    assert sweep.config.scheduler.type == "asha" and sweep.config.trial_count() >= 8
    assert sweep.config.scheduler.max_t is None or sweep.config.scheduler.max_t > sweep.max_steps()


def test_unknown_axis_field_fails_naming_file_and_axis(tmp_path):
    p = sweep_file(tmp_path, "  method.lambdaa: {grid: [0.1]}\n")
    with pytest.raises(ConfigError) as exc:
        load_sweep(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: search_space.method.lambdaa=0.1: ") and "unknown field" in msg


def test_axis_value_refused_by_the_job_fails(tmp_path):
    p = sweep_file(
        tmp_path, "  train.lr: {loguniform: [1.0e-5, 0.5]}\n  train.micro_batch: {choice: [8, 0]}\n"
    )
    with pytest.raises(ConfigError, match=r"search_space\.train\.micro_batch=0: train\.micro_batch"):
        load_sweep(p)


def test_axis_on_a_field_of_the_other_method_fails(tmp_path):
    p = sweep_file(tmp_path, job=str(REPO / "jobs" / "fashion_base_fm.yaml"))  # flow matching: no lambda
    with pytest.raises(
        ConfigError, match=r"search_space\.method\.lambda=0\.0: method\.flow_matching\.lambda"
    ):
        load_sweep(p)


@pytest.mark.parametrize(
    "extra, field",
    [
        ("  train.lr: {uniform: [0.1]}\n", "search_space.train.lr.uniform"),
        (
            "  train.lr: {uniform: [0.2, 0.1]}\n",
            "search_space.train.lr: Value error, uniform: need low < high",
        ),
        ("  train.lr: {grid: [0.1], choice: [0.2]}\n", "exactly one of"),
        ("  train.lr: {loguniform: [0.0, 0.1]}\n", "low must be > 0"),
        ("  train.lr: {grid: []}\n", "search_space.train.lr.grid"),
        ("evaluation: {nfe: [1, 1]}\n", "evaluation.nfe"),
        ("evaluation: {style: [fast]}\n", "evaluation.style.0"),
        ("evaluation: {rho: [1.5]}\n", "evaluation.rho"),
        ("evaluation: {evaluator: 'not a module'}\n", "evaluation.evaluator"),
        ("scheduler: {type: hyperband}\n", "scheduler.type"),
        ("trial_resources: {CPU: 0}\n", "trial_resources"),
        ("metric: eval/fd_nfe3\n", "metric: 'eval/fd_nfe3' is not produced"),
        (
            "evaluation: {evaluator: builtin}\n",
            "metric: 'eval/fd_nfe1' is not produced",
        ),  # builtin: eval/pcafd_*
        ("metric: totall\n", "metric: 'totall' is neither"),
        ("scheduler: {type: asha, metric: loss_e2e, max_t: 400}\n", "scheduler.max_t: 400 must exceed"),
        ("overrides: {method.lambda: 0.2}\n", "both swept and overridden"),
        ("overrides: {output.dir: /x}\n", "set per trial by the sweep"),
        ("overrides: {train.stepz: 3}\n", "train.stepz: unknown field"),
        ("plot_axis: train.lr\n", "plot_axis"),
        ("max_concurrent_trials: 0\n", "max_concurrent_trials"),
        ("search_spac: {}\n", "search_spac: unknown field"),
    ],
)
def test_invalid_sweeps_name_the_field(tmp_path, extra, field):
    p = sweep_file(tmp_path, extra)
    with pytest.raises(ConfigError) as exc:
        load_sweep(p)
    assert str(p) in str(exc.value) and field in str(exc.value)


def test_missing_base_job(tmp_path):
    p = sweep_file(tmp_path, job="jobs/nope.yaml")
    with pytest.raises(ConfigError, match=r"base_job: no such file"):
        load_sweep(p)


def test_base_job_resolves_against_cwd_then_the_sweep_file(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text((REPO / "jobs" / "fashion_twinflow.yaml").read_text())
    sub = tmp_path / "tune"
    sub.mkdir()
    monkeypatch.chdir(REPO)  # jobs/j.yaml is not under the repo: found next to the sweep file instead
    p = write(sub, BASE.format(job="../jobs/j.yaml"))
    assert load_sweep(p).base_job_path.resolve() == (tmp_path / "jobs" / "j.yaml").resolve()


def test_search_space_converts_to_tune_domains(tmp_path):
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    p = sweep_file(
        tmp_path,
        "  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  method.enhanced_ratio: {uniform: [0.3, 0.9]}\n"
        "  method.teacher: {choice: [ema, online]}\n"
        "  method.rollout_order: {randint: [1, 4]}\n"
        "num_samples: 3\n",
    )
    cfg = load_sweep(p).config
    space = cfg.param_space()
    assert space["method.lambda"] == tune.grid_search([0.0, 0.5])
    lr = space["train.lr"]
    assert (
        isinstance(lr, Float)
        and (lr.lower, lr.upper) == (1e-4, 1e-2)
        and type(lr.sampler).__name__.lstrip("_") == "LogUniform"
    )
    assert (
        isinstance(space["method.enhanced_ratio"], Float)
        and type(space["method.enhanced_ratio"].sampler).__name__.lstrip("_") == "Uniform"
    )
    assert isinstance(space["method.teacher"], Categorical) and space["method.teacher"].categories == [
        "ema",
        "online",
    ]
    assert isinstance(space["method.rollout_order"], Integer) and (
        space["method.rollout_order"].lower,
        space["method.rollout_order"].upper,
    ) == (1, 4)
    assert cfg.trial_count() == 3 * 2  # grid size x num_samples


def test_tune_expands_the_grid_into_trials(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    p = sweep_file(tmp_path, "  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\nnum_samples: 2\n")
    cfg = load_sweep(p).config
    configs = [c for _ in range(cfg.num_samples) for _, c in generate_variants(cfg.param_space())]
    assert len(configs) == cfg.trial_count() == 4
    assert sorted(c["method.lambda"] for c in configs) == [0.0, 0.0, 0.5, 0.5]
    assert all(1e-4 <= c["train.lr"] <= 1e-2 for c in configs)


def test_trial_job_has_its_own_name_dir_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep("tune/fashion_lambda_nfe.yaml")
    job = trial_job(
        sweep.base,
        {"method.lambda": 0.15},
        name="fashion_lambda_nfe-abc_00001",
        output_dir=str(tmp_path / "trials"),
        cwd=tmp_path,
    )
    assert job.name == "fashion_lambda_nfe-abc_00001" and job.output.dir == str(tmp_path / "trials")
    assert job.method.lambda_ == 0.15 and job.train.steps == sweep.base["train"]["steps"]
    # relative paths of the base job were made absolute against the driver's cwd (trials run elsewhere)
    assert job.data.path == str(REPO / "data" / "fashion_mnist")
    assert job.train.init_from == str(REPO / "runs" / "fashion_base_fm" / "export")
    with pytest.raises(ConfigError, match=r"method\.twinflow\.lambda"):
        trial_job(sweep.base, {"method.lambda": 2}, name="x", output_dir=str(tmp_path), cwd=tmp_path)


def test_eval_setting_names():
    assert EvalSetting(1, "few", 1.0).suffix == "nfe1"
    assert EvalSetting(4, "any", 0.5).suffix == "nfe4_any_rho0.5"
    assert EvalSetting(2, "few", 0.0).suffix == "nfe2_few_rho0"


def test_cli_dry_run_and_error(capsys, monkeypatch, tmp_path):
    from twinflow.cli import main

    monkeypatch.chdir(REPO)
    assert main(["tune", "tune/fashion_lambda_nfe.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials          5" in out and "nfe1, nfe2, nfe4" in out
    bad = sweep_file(tmp_path, "  method.nope: {grid: [1]}\n")
    assert main(["tune", str(bad)]) == 2
    assert "search_space.method.nope=1" in capsys.readouterr().err


def test_job_set_overrides_every_trial(monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(
        "tune/fashion_lambda_nfe.yaml",
        ["num_samples=2"],
        job_overrides=["train.steps=7", "train.init_from=/x/export"],
    )
    assert sweep.config.num_samples == 2 and sweep.base["train"]["steps"] == 7
    assert sweep.base["train"]["init_from"] == "/x/export"
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown field"):
        load_sweep("tune/fashion_lambda_nfe.yaml", job_overrides=["train.stepz=7"])
    with pytest.raises(ConfigError, match="both swept and overridden"):
        load_sweep("tune/fashion_lambda_nfe.yaml", job_overrides=["method.lambda=0.1"])
