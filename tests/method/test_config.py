import pytest
from pydantic import TypeAdapter

from twinflow.config import ConfigError
from twinflow.config.loading import validate
from twinflow.method import (
    FlowMatchingConfig,
    FlowMatchingObjective,
    MethodConfig,
    TwinFlowConfig,
    TwinFlowObjective,
    build_objective,
)


def test_yaml_keys_and_defaults():
    cfg = TwinFlowConfig.model_validate({"lambda": 0.33, "teacher": "ema", "cfg_interval": [0.1, 0.9]})
    assert cfg.lambda_ == 0.33 and cfg.cfg_interval == (0.1, 0.9)
    assert cfg.split(12).sizes == (2, 4, 4, 2)
    assert cfg.model_dump(by_alias=True)["lambda"] == 0.33
    d = TwinFlowConfig()
    defaults = (d.lambda_, d.kappa, d.enhanced_ratio, d.rollout_order, d.delta, d.loss)
    assert defaults == (0.5, 0.5, 0.8, 2, 0.01, "barron")


def test_group_weights_instead_of_lambda():
    cfg = TwinFlowConfig.model_validate({"group_weights": {"e2e": 1, "mul": 2, "any": 2, "adv": 1}})
    assert cfg.split(12).sizes == (2, 4, 4, 2)
    with pytest.raises(ValueError, match="either lambda or group_weights"):
        TwinFlowConfig.model_validate({"lambda": 0.3, "group_weights": {"e2e": 1}})
    with pytest.raises(ValueError, match="at least one group weight"):
        TwinFlowConfig.model_validate({"group_weights": {"e2e": 0, "mul": 0, "any": 0, "adv": 0}})


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"lambda": 1.5}, "lambda"),
        ({"lamda": 0.3}, "lamda"),
        ({"cfg_interval": [0.8, 0.2]}, "cfg_interval"),
        ({"rollout_order": 0}, "rollout_order"),
        ({"teacher": "swa"}, "teacher"),
        ({"loss": "l1"}, "loss"),
    ],
)
def test_invalid_fields_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=rf"job.yaml: {field}"):
        validate(TwinFlowConfig, bad, "job.yaml")


def test_method_section_is_a_tagged_union():
    adapter = TypeAdapter(MethodConfig)
    tf = adapter.validate_python({"name": "twinflow", "lambda": 0.2})
    fm = adapter.validate_python({"name": "flow_matching", "cond_dropout": 0.1})
    assert isinstance(tf, TwinFlowConfig) and isinstance(fm, FlowMatchingConfig)
    assert isinstance(build_objective(tf), TwinFlowObjective)
    assert isinstance(build_objective(fm), FlowMatchingObjective)
    with pytest.raises(Exception, match="name"):
        adapter.validate_python({"name": "gan"})


def test_self_referential_guidance_needs_w_below_one():
    """With an online or EMA teacher the baked-in CFG scale is ~1/(1 - w): w >= 1 has no fixed point."""
    for teacher in ("online", "ema"):
        with pytest.raises(
            ConfigError, match=r"job.yaml.*enhanced_ratio 1.5 >= 1 with the (online|ema) teacher"
        ):
            validate(TwinFlowConfig, {"teacher": teacher, "enhanced_ratio": 1.5}, "job.yaml")
    assert (
        validate(TwinFlowConfig, {"teacher": "frozen", "enhanced_ratio": 4.0}, "job.yaml").enhanced_ratio
        == 4.0
    )
