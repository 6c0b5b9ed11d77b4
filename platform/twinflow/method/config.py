"""The `method:` section of a job YAML: TwinFlow or plain flow matching, chosen by `name`.

method:
  name: twinflow
  lambda: 0.33          # share of rows for the TwinFlow groups (E2E + ADV)
  enhanced_ratio: 0.8   # w: CFG baked into targets (scale 1 + w with a frozen teacher, ~1/(1 - w) online/EMA)
  teacher: ema
  ema_decay: 0.99
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from twinflow.config import StrictModel
from twinflow.method.groups import GroupSplit, global_split, realises, smallest_batch


class GroupWeights(StrictModel):
    """Explicit relative row shares (instead of lambda); the reference default is 1 each."""

    e2e: float = Field(1.0, ge=0)
    mul: float = Field(1.0, ge=0)
    any: float = Field(1.0, ge=0)
    adv: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _positive_sum(self) -> GroupWeights:
        if self.e2e + self.mul + self.any + self.adv <= 0:
            raise ValueError("at least one group weight must be positive")
        return self


class TwinFlowConfig(StrictModel):
    name: Literal["twinflow"] = "twinflow"
    lambda_: float = Field(
        0.5,
        alias="lambda",
        ge=0,
        le=1,
        description="fraction of rows for E2E+ADV; 0.5 = reference quarters, 0 = base only",
    )
    group_weights: GroupWeights | None = Field(None, description="set the four group shares directly")
    kappa: float = Field(
        0.5,
        ge=0,
        description=(
            "rectify (self-adversarial) loss coefficient, per E2E row as in the reference at lambda 0.5: each "
            "E2E row adds kappa * 4/B * its rectify loss, so the push per row does not change with lambda"
        ),
    )
    enhanced_ratio: float = Field(
        0.8,
        ge=0,
        description=(
            "w: CFG baked into MUL/ANY targets. The guidance scale it trains is 1 + w with a frozen teacher, "
            "and about 1 / (1 - w) with an online or EMA teacher (the target refers to the model itself): "
            "5 at w = 0.8, 2 at w = 0.5; it must stay below 1 there, where that fixed point does not exist"
        ),
    )
    cfg_interval: tuple[float, float] = Field((0.0, 1.0), description="CFG applies where lo < t < hi")
    rollout_order: int = Field(2, ge=1, le=16, description="N teacher sub-steps in the RCGM rollout")
    delta: float = Field(0.01, gt=0, lt=1, description="RCGM exact step on the true path")
    loss: Literal["barron", "mse"] = "barron"
    barron_c: float = Field(1e-3, gt=0)
    time_weighting: bool = True
    teacher: Literal["ema", "online", "frozen"] = "online"
    ema_decay: float = Field(0.99, gt=0, lt=1)
    on_nonfinite: Literal["raise", "report"] = Field(
        "raise", description="raise NonFiniteLossError, or return the loss with metrics['nonfinite'] = 1"
    )

    @field_validator("cfg_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo < hi <= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _one_split_rule(self) -> TwinFlowConfig:
        if self.group_weights is not None and "lambda_" in self.model_fields_set:
            raise ValueError("set either lambda or group_weights, not both")
        return self

    @model_validator(mode="after")
    def _self_guidance_converges(self) -> TwinFlowConfig:
        if self.teacher != "frozen" and self.enhanced_ratio >= 1:
            raise ValueError(
                f"enhanced_ratio {self.enhanced_ratio} >= 1 with the {self.teacher} teacher: the self-referential "
                "CFG target has no fixed point (scale ~1/(1 - w)); use w < 1, or teacher: frozen (scale 1 + w)"
            )
        return self

    @property
    def rectifies(self) -> bool:
        """Whether a step has E2E rows (and so a rectify pair) somewhere in its global batch."""
        e2e = self.group_weights.e2e if self.group_weights is not None else self.lambda_
        return self.kappa > 0 and e2e > 0

    def _shares(self) -> dict:
        if self.group_weights is not None:
            return {"weights": self.group_weights.model_dump()}
        return {"lambda_": self.lambda_}

    def split(self, batch_size: int) -> GroupSplit:
        """Group sizes over a global batch of `batch_size` rows (`groups.global_split`)."""
        return global_split(batch_size, **self._shares())

    def check_global_batch(self, rows: int) -> str | None:
        """Why a global batch of `rows` cannot realise the asked shares within one row (None if it can)."""
        try:
            split = self.split(rows)
        except ValueError as exc:
            split, reason = None, str(exc)
        if split is not None and realises(split, **self._shares()):
            return None
        asked = (
            f"group_weights {self.group_weights.model_dump()}"
            if self.group_weights is not None
            else f"lambda {self.lambda_:g} ({self.lambda_ * rows:.2f} of {rows} rows)"
        )
        got = f"gives {split.as_dict()}" if split is not None else reason
        least = smallest_batch(**self._shares())
        return f"{asked}: a global batch of {rows} rows {got}; it needs at least {least} rows"


class FlowMatchingConfig(StrictModel):
    """Plain flow matching; `sample_guidance` is how the base is meant to be sampled (TwinFlow bakes its
    guidance into training and samples at 0)."""

    name: Literal["flow_matching"] = "flow_matching"
    loss: Literal["barron", "mse"] = "mse"
    barron_c: float = Field(1e-3, gt=0)
    cond_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="rows trained on the null condition, so CFG and TwinFlow's "
        "baked-in CFG have a meaningful unconditional branch",
    )
    sample_guidance: float = Field(
        0.0,
        ge=0,
        description=(
            "CFG w used when this model is sampled (grids, judge metrics, the export's recommended setting): "
            "F = F_c + w (F_c - F_null), i.e. scale 1 + w; needs cond_dropout > 0"
        ),
    )
    on_nonfinite: Literal["raise", "report"] = "raise"

    @model_validator(mode="after")
    def _guidance_needs_dropout(self) -> FlowMatchingConfig:
        if self.sample_guidance > 0 and self.cond_dropout == 0:
            raise ValueError(
                "sample_guidance > 0 needs cond_dropout > 0: without null-condition rows the "
                "model has no trained unconditional branch to guide against"
            )
        return self


def sample_guidance_of(method_config: TwinFlowConfig | FlowMatchingConfig | dict | None) -> float:
    """The sampling CFG of a method (a job's `method:` section, or an export's recorded
    `method_config`): a flow-matching base's `sample_guidance`; 0 for TwinFlow (its CFG is baked in)."""
    if isinstance(method_config, (TwinFlowConfig, FlowMatchingConfig)):
        method_config = method_config.model_dump()
    if not method_config or method_config.get("name") != "flow_matching":
        return 0.0
    return float(method_config.get("sample_guidance", 0.0))


MethodConfig = Annotated[TwinFlowConfig | FlowMatchingConfig, Field(discriminator="name")]
