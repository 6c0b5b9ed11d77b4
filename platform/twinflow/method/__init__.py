"""The TwinFlow method as plain torch: objectives, teacher/EMA, any-step sampler, 2-D toy.

Models are callables `model(x, t, r, cond) -> velocity` (docs/architecture.md). No Ray or DeepSpeed.
"""

from twinflow.method.conditioning import cat_cond, cond_batch_size, expand_cond, mix_cond, take_cond
from twinflow.method.config import FlowMatchingConfig, GroupWeights, MethodConfig, TwinFlowConfig
from twinflow.method.ema import EMA, Teacher, next_decay
from twinflow.method.flow_matching import FlowMatchingObjective
from twinflow.method.groups import GROUP_NAMES, GroupSplit, split_groups, weights_from_lambda
from twinflow.method.losses import barron_loss, mse_loss, row_loss, time_weight
from twinflow.method.objective import NonFiniteLossError, ObjectiveOutput
from twinflow.method.sampler import SamplerSettings, preset, sample, settings_for, time_grid
from twinflow.method.targets import enhance_velocity, rcgm_target
from twinflow.method.times import sample_times
from twinflow.method.twinflow import TwinFlowObjective

__all__ = [
    "EMA",
    "GROUP_NAMES",
    "FlowMatchingConfig",
    "FlowMatchingObjective",
    "GroupSplit",
    "GroupWeights",
    "MethodConfig",
    "NonFiniteLossError",
    "ObjectiveOutput",
    "SamplerSettings",
    "Teacher",
    "TwinFlowConfig",
    "TwinFlowObjective",
    "barron_loss",
    "build_objective",
    "cat_cond",
    "cond_batch_size",
    "enhance_velocity",
    "expand_cond",
    "mix_cond",
    "mse_loss",
    "next_decay",
    "preset",
    "rcgm_target",
    "row_loss",
    "sample",
    "sample_times",
    "settings_for",
    "split_groups",
    "take_cond",
    "time_grid",
    "time_weight",
    "weights_from_lambda",
]


def build_objective(config: TwinFlowConfig | FlowMatchingConfig) -> TwinFlowObjective | FlowMatchingObjective:
    """The objective a `method:` section names (here, above both, so config and objectives import
    only downwards)."""
    if isinstance(config, TwinFlowConfig):
        return TwinFlowObjective(config)
    if isinstance(config, FlowMatchingConfig):
        return FlowMatchingObjective(config)
    raise TypeError(f"not a method config: {type(config).__name__}")
