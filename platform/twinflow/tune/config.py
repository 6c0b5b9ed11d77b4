"""The sweep YAML (`tune/*.yaml`): one pydantic model, checked against the base job before anything starts.

    name: fashion_lambda_nfe
    base_job: jobs/fashion_twinflow.yaml
    overrides: {train.steps: 300, cluster.num_workers: 1}     # every trial
    search_space:                                              # any job field, dotted
      method.lambda: {grid: [0.0, 0.33, 0.5]}
      train.lr: {loguniform: [1.0e-4, 1.0e-3]}
    evaluation: {nfe: [1, 2, 4], style: [few], rho: [1.0]}    # eval-only axes: no retraining
    metric: eval/fd_nfe1
    mode: min
    scheduler: {type: asha, metric: total, grace_period: 100}
    num_samples: 1
    max_concurrent_trials: 1
    storage: runs/tune                                         # or s3://bucket/prefix

`load_sweep` validates the file, then loads the base job (with `overrides`) and validates every
search-space value (grid/choice values, the ends of ranges) as a real JobConfig: an axis that names a
nonexistent field, or a value the field refuses, fails with the sweep file and the axis named.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import Field, field_validator, model_validator

from twinflow import storage
from twinflow.config import ConfigError, StrictModel
from twinflow.config.loading import apply_overrides, parse_override, read_yaml, validate, with_fields
from twinflow.eval.sampling import OWN_RHO, OWN_STYLE
from twinflow.method.groups import GROUP_NAMES
from twinflow.train.config import JobConfig
from twinflow.train.paths import NAME_PATTERN
from twinflow.train.tracking import TrackingConfig

# Metrics the training worker reports with each checkpoint (besides eval/*): see train/worker.py.
TRAIN_METRIC = re.compile(
    r"^(step|samples_seen|total|dv_abs|model_calls|nograd_rows|nonfinite|samples_per_s"
    r"|data_wait_frac|data_startup_s|step_s|elapsed_s|cpu_s|peak_mem_mb|loss_[a-z0-9_]+)$"
)
# Job fields holding local paths: resolved against the driver's working directory before the trials
# start (a Tune trial runs in its own trial directory).
PATH_FIELDS = (
    ("data", "path"),
    ("data", "text_encoder_dir"),
    ("data", "embed_cache_path"),
    ("train", "init_from"),
    ("model", "pretrained_path"),
    ("model", "vae_path"),
    ("output", "dir"),
)
# A setting with this style and rho is the model's own sampler and gets the plain metric name.
PRESET_STYLE, PRESET_RHO = OWN_STYLE, OWN_RHO


class Axis(StrictModel):
    """One search-space axis: exactly one of grid, choice, uniform, loguniform, randint."""

    grid: list[Any] | None = Field(
        None, min_length=1, description="every value, one trial each (times num_samples)"
    )
    choice: list[Any] | None = Field(None, min_length=1, description="one value drawn per trial")
    uniform: tuple[float, float] | None = Field(None, description="[low, high] drawn uniformly")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high] drawn log-uniformly, low > 0"
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high) integers")

    @model_validator(mode="after")
    def _exactly_one(self) -> Axis:
        set_ = [
            k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None
        ]
        if len(set_) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform, randint"
                + (f" (got {', '.join(set_)})" if set_ else "")
            )
        for k in ("uniform", "loguniform", "randint"):
            lo_hi = getattr(self, k)
            if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
                raise ValueError(f"{k}: need low < high, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(
            k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None
        )

    @property
    def grid_size(self) -> int:
        return len(self.grid) if self.grid is not None else 1

    def probe_values(self) -> list[Any]:
        """Values that must each validate as the field: all listed values, both ends of a range."""
        if self.grid is not None:
            return list(self.grid)
        if self.choice is not None:
            return list(self.choice)
        if self.randint is not None:
            return [self.randint[0], self.randint[1] - 1]
        lo, hi = self.uniform if self.uniform is not None else self.loguniform
        return [lo, hi, math.sqrt(lo * hi) if self.loguniform is not None else (lo + hi) / 2]

    def to_tune(self):
        from ray import tune  # Ray only when a sweep runs: loading and checking a sweep stay light

        if self.grid is not None:
            return tune.grid_search(list(self.grid))
        if self.choice is not None:
            return tune.choice(list(self.choice))
        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        return tune.randint(*self.randint)


@dataclass(frozen=True)
class EvalSetting:
    """One point of the evaluation-only axes (applied to a trained trial, no retraining)."""

    nfe: int
    style: str
    rho: float

    @property
    def suffix(self) -> str:
        """`nfe1` for the preset sampler (few style, rho 1), else e.g. `nfe2_any_rho0.5`."""
        extra = (
            "" if (self.style, self.rho) == (PRESET_STYLE, PRESET_RHO) else f"_{self.style}_rho{self.rho:g}"
        )
        return f"nfe{self.nfe}{extra}"

    def sampler_overrides(self) -> dict[str, Any]:
        """`settings_for` arguments: none for the model's own sampler (few style, rho 1: TwinFlow's
        presets, or a flow-matching base's ODE), else this style and rho."""
        if (self.style, self.rho) == (PRESET_STYLE, PRESET_RHO):
            return {}
        return {"style": self.style, "rho": self.rho}


class EvaluationConfig(StrictModel):
    """Evaluation-only axes and how each trial's final model is scored after training."""

    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1, description="sampling steps")
    style: list[Literal["few", "any", "mul"]] = Field(
        default_factory=lambda: ["few"], min_length=1, description="sampler styles (twinflow.method.sampler)"
    )
    rho: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        description="re-noising between steps (1 = fresh noise, the preset)",
    )
    evaluator: str = Field(
        "twinflow.eval",
        description="twinflow.eval (the judges: fd, adherence, diversity, "
        "collapse), builtin (judge-free pixel-PCA pcafd, pcaadh), "
        "or module:function",
    )
    split: str = Field("eval", description="shards split holding the real reference images")
    samples: int = Field(
        500,
        ge=8,
        description="generated images per setting (twinflow.eval: rounded up to "
        "a whole number per class, class-balanced)",
    )
    reference: int = Field(
        1000, ge=16, description="builtin: real images for the PCA basis and Fréchet reference"
    )
    pca_dim: int = Field(64, ge=2, description="builtin: feature dimensions")
    feature_size: int = Field(
        32,
        ge=4,
        description="builtin: larger images are area-downsampled to this side "
        "before the PCA (28x28 Fashion-MNIST stays as is)",
    )
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    grid_images_per_prompt: int = Field(4, ge=1, description="best trial's sample grid: images per prompt")

    @field_validator("nfe")
    @classmethod
    def _nfe(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v) or len(set(v)) != len(v):
            raise ValueError(f"nfe values must be distinct and >= 1, got {v}")
        return v

    @field_validator("rho")
    @classmethod
    def _rho(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= r <= 1.0 for r in v) or len(set(v)) != len(v):
            raise ValueError(f"rho values must be distinct and in [0, 1], got {v}")
        return v

    @field_validator("style")
    @classmethod
    def _style(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"style values must be distinct, got {v}")
        return v

    @field_validator("evaluator")
    @classmethod
    def _evaluator(cls, v: str) -> str:
        if v not in ("builtin", "twinflow.eval") and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError(f"evaluator must be builtin, twinflow.eval or module:function, got {v!r}")
        return v

    def settings(self) -> list[EvalSetting]:
        return [EvalSetting(n, s, float(r)) for s in self.style for r in self.rho for n in self.nfe]

    @property
    def families(self) -> tuple[str, ...]:
        """Per-setting metric names of the evaluator (empty for a custom one): fd-like first."""
        return {
            "twinflow.eval": ("fd", "adherence", "diversity", "collapse", "saturation")
            + ("fd_ae", "diversity_ae", "collapse_ae"),  # the second feature space (MNIST, Fashion-MNIST)
            "builtin": ("pcafd", "pcaadh"),
        }.get(self.evaluator, ())

    def metric_names(self) -> set[str]:
        """What the evaluator reports (unknown for a custom one: empty)."""
        floors = {
            "twinflow.eval": ("fd", "diversity", "saturation", "fd_ae", "diversity_ae"),
            "builtin": ("pcafd", "pcaadh"),
        }.get(self.evaluator, ())
        names = {f"eval/{f}_floor" for f in floors}
        for s in self.settings():
            names |= {f"eval/{f}_{s.suffix}" for f in self.families}
        return names


class SchedulerConfig(StrictModel):
    """Early stopping. ASHA compares trials on `metric` at rungs of `time_attr` (reports come at
    each train.checkpoint_every)."""

    type: Literal["asha", "none"] = "none"
    metric: str | None = Field(
        None,
        description="metric the scheduler compares (default: the sweep metric); "
        "must be reported during training to stop anything early",
    )
    mode: Literal["min", "max"] | None = Field(None, description="default: the sweep mode")
    time_attr: Literal["step", "training_iteration"] = "step"
    grace_period: int = Field(1, ge=1, description="no trial is stopped before this")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(
        None,
        ge=1,
        description="default: the largest train.steps + 1; must exceed every "
        "trial's last report, or ASHA stops finished trials before "
        "their evaluation (and leaks their placement group, ray#54305)",
    )


class SweepConfig(StrictModel):
    """A Ray Tune sweep over job fields, each trial a Ray Train job (Tune over Train)."""

    name: str = Field(
        ...,
        pattern=NAME_PATTERN,
        description="the sweep directory's name under storage (never "
        "'.' or '..': --fresh deletes <storage>/<name>)",
    )
    base_job: str = Field(
        ...,
        description="job YAML every trial starts from (relative to the working "
        "directory, else to this file's directory)",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="dotted job field -> value, every trial"
    )
    search_space: dict[str, Axis] = Field(..., min_length=1, description="dotted job field -> axis")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    metric: str = Field(
        "eval/fd_nfe1", description="what picks the best trial: an eval/* name or a training metric"
    )
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    num_samples: int = Field(1, ge=1, description="repeats of the grid (random axes drawn anew each time)")
    max_concurrent_trials: int = Field(1, ge=1)
    trial_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 0.01},
        description="the Tune trial (the Train job's driver); 0 CPU raises",
    )
    seed: int = Field(0, description="seed of the random axes")
    storage: str = Field(
        "runs/tune", description="local dir or s3://bucket/prefix; the sweep lives in <storage>/<name>"
    )
    s3_endpoint: str | None = Field(None, description="default: $TWINFLOW_S3_ENDPOINT / $AWS_ENDPOINT_URL")
    staging_dir: str = Field(
        "runs/tune-staging",
        description="with s3:// storage: local dir where trials train "
        "(the trainer's run dir is local-only today)",
    )
    plot_axis: str | None = Field(
        None, description="x axis of the metric plot; default: method.lambda if swept, else the first axis"
    )
    release_placement_groups: bool = Field(
        True,
        description="ray#54305 guard: remove a finished or stopped trial's Train placement group (keep on)",
    )
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="mlflow: {tracking_uri, experiment}: one run per trial, the best tagged (twinflow.tune.tracking)",
    )

    @field_validator("search_space", "overrides")
    @classmethod
    def _dotted(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not re.match(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$", key):
                raise ValueError(f"{key!r} is not a dotted job field such as method.lambda")
        return v

    @field_validator("trial_resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if v.get("CPU", 0) <= 0:
            raise ValueError("trial_resources needs CPU > 0 (e.g. 0.01; Tune rejects 0)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        clash = sorted(set(self.search_space) & set(self.overrides))
        if clash:
            raise ValueError(f"fields both swept and overridden: {clash}")
        owned = sorted(
            k for k in list(self.search_space) + list(self.overrides) if k in ("name", "output.dir")
        )
        if owned:
            raise ValueError(f"{owned}: set per trial by the sweep (<sweep>-<trial id>, under the storage)")
        if self.plot_axis is not None and self.plot_axis not in self.search_space:
            raise ValueError(f"plot_axis {self.plot_axis!r} is not a search_space axis")
        return self

    # ---- derived -------------------------------------------------------------------------------
    @property
    def x_axis(self) -> str:
        if self.plot_axis:
            return self.plot_axis
        return "method.lambda" if "method.lambda" in self.search_space else next(iter(self.search_space))

    @property
    def scheduler_metric(self) -> str:
        return self.scheduler.metric or self.metric

    @property
    def scheduler_mode(self) -> str:
        return self.scheduler.mode or self.mode

    @property
    def is_s3(self) -> bool:
        return storage.is_s3(self.storage)

    def trial_count(self) -> int:
        n = self.num_samples
        for axis in self.search_space.values():
            n *= axis.grid_size
        return n

    def param_space(self) -> dict[str, Any]:
        return {k: a.to_tune() for k, a in self.search_space.items()}


# ---- building trial jobs ----------------------------------------------------------------------------
def resolve_paths(data: dict[str, Any], cwd: str | Path) -> dict[str, Any]:
    """Make the job's local paths absolute against `cwd` (URIs and absolute paths stay)."""
    for section, key in PATH_FIELDS:
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and sec[key] and "://" not in sec[key]:
            p = Path(sec[key]).expanduser()
            sec[key] = str(p if p.is_absolute() else (Path(cwd) / p).resolve())
    return data


def trial_job_data(
    base: Mapping[str, Any], params: Mapping[str, Any], *, name: str, output_dir: str, cwd: str | Path
) -> dict[str, Any]:
    """The job dict of one trial: base (overrides already in) + its parameter values, its own name
    and output dir, local paths absolute."""
    data = with_fields(base, params)
    data["name"] = name
    data.setdefault("output", {})
    data["output"]["dir"] = output_dir
    return resolve_paths(data, cwd)


def trial_job(
    base: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    name: str,
    output_dir: str,
    cwd: str | Path,
    source: str = "sweep trial",
):
    return validate(
        JobConfig, trial_job_data(base, params, name=name, output_dir=output_dir, cwd=cwd), source
    )


# ---- loading ----------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """A validated sweep: the YAML model, where it came from, and its base job (overrides applied)."""

    config: SweepConfig
    path: Path
    base_job_path: Path
    base: dict[str, Any]  # the base job as a dict, overrides applied, local paths absolute
    cwd: Path

    @property
    def name(self) -> str:
        return self.config.name

    def base_job(self):
        return validate(JobConfig, self.base, str(self.base_job_path))

    def max_steps(self) -> int:
        """The largest train.steps any trial can have."""
        steps = [int(self.base["train"]["steps"])]
        axis = self.config.search_space.get("train.steps")
        if axis is not None:
            steps += [int(v) for v in axis.probe_values()]
        return max(steps)


def experiment_path(sweep: Sweep) -> str:
    cfg = sweep.config
    if cfg.is_s3:
        return cfg.storage.rstrip("/") + "/" + cfg.name
    return str((sweep.cwd / cfg.storage / cfg.name).resolve())


def local_sweep_dir(sweep: Sweep) -> Path:
    """Where trials train and the report is written locally (the experiment dir itself when local)."""
    cfg = sweep.config
    if cfg.is_s3:
        return (sweep.cwd / cfg.staging_dir / cfg.name).resolve()
    return Path(experiment_path(sweep))


def _locate(base_job: str, sweep_path: Path) -> Path:
    p = Path(base_job).expanduser()
    if p.is_absolute() or p.is_file():
        return p
    alt = sweep_path.parent / p
    return alt if alt.is_file() else p


def lambda_collapse(cfg: SweepConfig, base: JobConfig) -> str | None:
    """Two lambdas of the grid that the trials' global batch realises as the same group split (the
    trials would be one run twice), with the smallest global batch that tells them all apart."""
    axis = cfg.search_space.get("method.lambda")
    values = (axis.grid or axis.choice) if axis is not None else None
    if not values or getattr(base.method, "name", None) != "twinflow":
        return None

    def splits(rows: int) -> dict[tuple, float]:
        seen: dict[tuple, float] = {}
        for lam in values:
            sizes = base.method.model_copy(update={"lambda_": float(lam)}).split(rows).sizes
            if sizes in seen:
                raise ValueError(lam, seen[sizes], sizes)
            seen[sizes] = float(lam)
        return seen

    rows = base.global_batch
    try:
        splits(rows)
        return None
    except ValueError as exc:
        lam, other, sizes = exc.args
    need = next((n for n in range(rows + 1, 4097) if _distinct(splits, n)), None)
    return (
        f"{other:g} and {float(lam):g} both give the group split {dict(zip(GROUP_NAMES, sizes))} of the "
        f"trials' global batch of {rows} rows (cluster.num_workers x train.micro_batch x "
        f"deepspeed.gradient_accumulation_steps): the trials would train the same thing; a global batch "
        f"of {need} rows tells the grid apart"
    )


def _distinct(splits, rows: int) -> bool:
    try:
        splits(rows)
        return True
    except ValueError:
        return False


def check_metric(name: str, evaluation: EvaluationConfig, where: str) -> None:
    if name.startswith("eval/"):
        if evaluation.families and name not in evaluation.metric_names():
            known = ", ".join(sorted(evaluation.metric_names()))
            raise ValueError(f"{where}: {name!r} is not produced by the evaluation axes; known: {known}")
    elif not TRAIN_METRIC.match(name):
        raise ValueError(
            f"{where}: {name!r} is neither an eval/* metric nor a training metric "
            "(step, total, loss_<group>, dv_abs, ...)"
        )


def load_sweep(
    path: str | Path,
    overrides: Iterable[str] = (),
    cwd: str | Path | None = None,
    job_overrides: Iterable[str] = (),
) -> Sweep:
    """Validate a sweep YAML and everything it points at; raise ConfigError naming the file and field.

    `overrides`: sweep fields (`--set num_samples=2`); `job_overrides`: job fields set in every trial
    (`--job-set train.steps=100`), i.e. extra entries of the sweep's `overrides:`."""
    path = Path(path)
    src = str(path)
    raw = apply_overrides(read_yaml(path), overrides)
    for text in job_overrides:
        parts, value = parse_override(text)
        if not isinstance(raw.get("overrides", {}), dict):
            break  # the model reports the bad `overrides`
        raw.setdefault("overrides", {})[".".join(parts)] = value
    cfg = validate(SweepConfig, raw, src)
    cwd = Path(cwd or Path.cwd()).resolve()
    job_path = _locate(cfg.base_job, path)
    if not job_path.is_absolute():
        job_path = cwd / job_path
    if not job_path.is_file():
        raise ConfigError(
            f"{src}: base_job: no such file {cfg.base_job!r} (relative to {cwd} or {path.parent})"
        )
    base_raw = read_yaml(job_path)
    try:
        base = with_fields(base_raw, cfg.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{src}: overrides: {exc}") from None
    validate(JobConfig, base, f"{job_path} (with the overrides of {src})")
    resolve_paths(base, cwd)

    # every search-space value must make a valid job, alone (the other axes at their base values)
    for key, axis in cfg.search_space.items():
        for value in axis.probe_values():
            try:
                trial_job(
                    base,
                    {key: value},
                    name=f"{cfg.name}-probe",
                    output_dir=str(cwd),
                    cwd=cwd,
                    source=f"{src}: search_space.{key}={value!r}",
                )
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None

    sweep = Sweep(cfg, path, job_path, base, cwd)
    problems = []
    collapsed = lambda_collapse(cfg, sweep.base_job())
    if collapsed:
        problems.append(f"{src}: search_space.method.lambda: {collapsed}")
    checks = [(cfg.metric, "metric")] + (
        [(cfg.scheduler.metric, "scheduler.metric")] if cfg.scheduler.metric else []
    )
    for name, where in checks:
        try:
            check_metric(name, cfg.evaluation, where)
        except ValueError as exc:
            problems.append(f"{src}: {exc}")
    if cfg.scheduler.type == "asha" and cfg.scheduler.max_t is not None and cfg.scheduler.time_attr == "step":
        if cfg.scheduler.max_t <= sweep.max_steps():
            problems.append(
                f"{src}: scheduler.max_t: {cfg.scheduler.max_t} must exceed the largest train.steps "
                f"({sweep.max_steps()}): ASHA would stop finished trials before their evaluation"
            )
    if (
        cfg.scheduler.type == "asha"
        and cfg.scheduler.grace_period > sweep.max_steps()
        and cfg.scheduler.time_attr == "step"
    ):
        problems.append(
            f"{src}: scheduler.grace_period: {cfg.scheduler.grace_period} is beyond train.steps "
            f"({sweep.max_steps()}): nothing could ever be stopped"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    return sweep
