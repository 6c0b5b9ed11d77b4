"""Sections of the job YAML that belong to distributed training (cluster, deepspeed, train, eval, output).

Kept free of heavy imports so the DeepSpeed glue and tests can use them alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from twinflow.config import StrictModel


class ClusterConfig(StrictModel):
    """Where the job runs. No address: an embedded local Ray cluster (oversubscribed CPUs)."""

    address: str | None = Field(None, description="Ray address ('auto', 'ray://host:10001'); None = local")
    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    local_num_cpus: int = Field(
        4,
        ge=1,
        description="logical CPUs of the embedded local cluster (oversubscribed so Ray Data never starves)",
    )
    object_store_memory_mb: int = Field(512, ge=78)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class DeepSpeedConfig(StrictModel):
    """The DeepSpeed engine: ZeRO stage, precision, offload. Kept apart from the model."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters on CPU between uses")
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0, le=1e6, description="max gradient norm; 0 = off")

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self) -> DeepSpeedConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params requires zero_stage: 3")
        return self


class TrainConfig(StrictModel):
    steps: int = Field(..., ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW's decoupled decay per unit of lr")
    betas: tuple[
        Annotated[float, Field(ge=0, lt=1)],
        Annotated[float, Field(ge=0, lt=1)],
    ] = Field((0.9, 0.999), description="Adam's moment decays, each in [0, 1)")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up over this many steps")
    sample_ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "decay of an EMA of the weights kept for sampling: the export, grids and "
            "evaluation use it (e.g. 0.999); null = the online weights"
        ),
    )
    micro_batch: int = Field(32, ge=1, description="rows per rank per micro-step")
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(1, ge=0, description="worker-group restarts before the job fails")
    init_from: str | None = Field(
        None, description="an exported model directory (e.g. runs/<job>/export) to fine-tune from"
    )


class EvalConfig(StrictModel):
    prompts: list[str] = Field(default_factory=list)
    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4])
    every: int = Field(0, ge=0, description="steps between sample grids; 0 = only at the end")
    images_per_prompt: int = Field(4, ge=1)
    seed: int = 1234
    metrics: bool = Field(
        True,
        description="judge-based metrics (Frechet distance, adherence, diversity per "
        "NFE) at each eval when the data has a judge (twinflow.eval)",
    )
    metric_images_per_prompt: int = Field(32, ge=2, description="samples per prompt for the metrics")
    reference: str | None = Field(
        None,
        description="shards (local or s3://) whose eval/train splits are the metrics' real images; "
        "default: data.path",
    )

    @model_validator(mode="after")
    def _positive_nfe(self) -> EvalConfig:
        if any(n < 1 for n in self.nfe):
            raise ValueError("every nfe must be >= 1")
        return self


class OutputConfig(StrictModel):
    dir: str = Field("runs", description="local directory or s3://bucket/prefix holding <job name>/")
    s3_endpoint: str | None = None
    tensorboard: bool = True
