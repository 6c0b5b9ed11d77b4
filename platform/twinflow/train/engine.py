"""DeepSpeed glue: a config dict from the job's sections, and an engine that compiles nothing on CPU.

Kept apart from the model and the method (torchtitan-style): the worker loop hands a plain nn.Module
and its trainable parameters here and gets back an engine that forwards like the module.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch

if TYPE_CHECKING:
    from twinflow.train.sections import DeepSpeedConfig, TrainConfig


def zero_stage_for(ds: DeepSpeedConfig, world_size: int) -> int:
    """The ZeRO stage the engine runs. ZeRO-1/2 partition optimizer states and gradients across ranks;
    with one rank there is nothing to partition, and ZeRO-2's gradient bucketing and copies cost
    ~25 ms per step on the tiny model (benchmarks/step_overhead.py): stage 0 then. Optimizer offload
    needs a ZeRO optimizer, and ZeRO-3 shards parameters (memory), so those keep their stage."""
    if world_size == 1 and ds.zero_stage in (1, 2) and not ds.offload_optimizer:
        return 0
    return ds.zero_stage


def deepspeed_config(ds: DeepSpeedConfig, train: TrainConfig, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": zero_stage_for(ds, world_size)}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Small models: gather whole layers at once instead of many tiny all-gathers.
        zero["stage3_param_persistence_threshold"] = 0
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.betas),
                "weight_decay": train.weight_decay,
                # torch's AdamW instead of FusedAdam / DeepSpeedCPUAdam: no JIT compile on CPU-only
                # machines (also with optimizer offload, where the states already live on the CPU).
                "torch_adam": not torch.cuda.is_available(),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _skip_cpu_jit_builds() -> None:
    """On CPU, gloo does the collectives: skip DeepSpeed's ~30 s shared-memory comm-op compile."""
    if torch.cuda.is_available():
        return
    import deepspeed.comm.torch  # noqa: F401  (module must be loaded to patch it)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_engine(model: torch.nn.Module, params: Iterable[torch.nn.Parameter], ds_cfg: dict[str, Any]):
    import deepspeed

    _skip_cpu_jit_builds()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(params), config=ds_cfg)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # averaging gradients over one rank is the identity, but DeepSpeed still flattens them into
        # buffers and all-reduces those every step (~5 ms on the tiny model): skip it
        engine.enable_backward_allreduce = False
    return engine


@contextlib.contextmanager
def full_parameters(
    module: torch.nn.Module, zero_stage: int, modifier_rank: int | None = None
) -> Iterator[None]:
    """Under ZeRO-3 parameters are sharded: gather them (on every rank) for EMA, export or sampling."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield
