"""The DeepSpeed config the worker builds: ZeRO-1/2 with a single rank runs as stage 0."""

from __future__ import annotations

import pytest

from twinflow.train.engine import deepspeed_config
from twinflow.train.sections import DeepSpeedConfig, TrainConfig


@pytest.mark.parametrize(
    "zero, offload, world, stage",
    [
        (2, False, 1, 0),  # nothing to partition with one rank: skip ZeRO-2's bucketing and copies
        (1, False, 1, 0),
        (2, False, 2, 2),
        (2, True, 1, 2),  # optimizer offload needs the ZeRO optimizer
        (3, False, 1, 3),  # ZeRO-3 shards parameters: kept
        (0, False, 4, 0),
    ],
)
def test_zero_stage_for_the_world_size(zero, offload, world, stage):
    ds = DeepSpeedConfig(zero_stage=zero, offload_optimizer=offload)
    cfg = deepspeed_config(ds, TrainConfig(steps=1, micro_batch=4), world)
    assert cfg["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in cfg["zero_optimization"]) == offload
