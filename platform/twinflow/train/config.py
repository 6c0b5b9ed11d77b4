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

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step: workers x micro-batch x gradient accumulation."""
        return self.cluster.num_workers * self.train.micro_batch * self.deepspeed.gradient_accumulation_steps

    @model_validator(mode="after")
    def _global_split(self) -> JobConfig:
        """TwinFlow's group shares are realised over the global batch: refuse one that cannot hold them
        within a row (lambda would silently mean another value)."""
        check = getattr(self.method, "check_global_batch", None)
        why = check(self.global_batch) if check is not None else None
        if why:
            raise ValueError(
                "method.lambda / group_weights need a larger global batch (cluster.num_workers x "
                f"train.micro_batch x deepspeed.gradient_accumulation_steps = {self.cluster.num_workers} x "
                f"{self.train.micro_batch} x {self.deepspeed.gradient_accumulation_steps}): {why}"
            )
        return self

    @model_validator(mode="after")
    def _edit_job(self) -> JobConfig:
        """Fields an edit job cannot use: it trains without a null condition (edit pairs have one right
        answer per source and instruction), so no condition dropout or baked-in CFG, whose null
        condition would carry no reference image; and it is scored on held-out pairs, not prompts."""
        if not self.data.is_edit:
            return self
        m = self.method
        bad = [
            f"method.{name}={getattr(m, name)}"
            for name in ("cond_dropout", "enhanced_ratio")
            if getattr(m, name, 0) > 0
        ]
        if bad:
            raise ValueError(
                f"an edit job (data.text_column: instruction) trains without a null condition; set "
                f"{' and '.join(b.split('=')[0] + ': 0' for b in bad)} (got {', '.join(bad)})"
            )
        if self.eval.prompts:
            raise ValueError(
                "eval.prompts are text-to-image prompts; an edit job is scored on held-out edit pairs by "
                "`twinflow eval` (set eval.prompts: [])"
            )
        return self


def load_job(path: str | Path, overrides: Iterable[str] = ()) -> JobConfig:
    return load_config(path, JobConfig, overrides)
