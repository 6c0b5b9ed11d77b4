"""The job YAML (`jobs/*.yaml`): one pydantic model, one section per component (torchtitan-style).

The data, model and method sections are owned by their packages; this module only composes them
and adds the sections that belong to distributed training (cluster, deepspeed, train, eval, output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pydantic import Field, model_validator

from twinflow.config import StrictModel, load_config
from twinflow.data.config import DataConfig
from twinflow.method.config import MethodConfig
from twinflow.models.config import ModelConfig
from twinflow.train.paths import NAME_PATTERN
from twinflow.train.sections import ClusterConfig, DeepSpeedConfig, EvalConfig, OutputConfig, TrainConfig
from twinflow.train.tracking import TrackingConfig


class JobConfig(StrictModel):
    """A training job. Every shipped `jobs/*.yaml` validates against this model in the tests."""

    name: str = Field(
        ...,
        pattern=NAME_PATTERN,
        description="the run directory's name under output.dir: a letter or digit, then letters, "
        "digits, '_', '.' or '-' (never '.' or '..': --fresh deletes <output.dir>/<name>)",
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _edit_job(self) -> JobConfig:
        from twinflow.train.editing import check_edit_job

        check_edit_job(self)
        return self


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    return load_config(path, JobConfig, overrides)
