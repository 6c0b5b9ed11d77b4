"""Config files: a YAML alias bomb or a self-referencing alias is a config error naming the file, and a
non-finite or out-of-range number is refused naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinflow.config import ConfigError
from twinflow.serve.cli import load_plan
from twinflow.train.config import load_job

JOB = Path(__file__).resolve().parents[2] / "jobs" / "fashion_base_fm.yaml"

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, n in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.timeout(20)
def test_yaml_aliases_are_a_config_error_naming_the_file(tmp_path):
    """9^9 (387 million) leaves from 600 bytes; and a mapping that contains itself."""
    assert len(BOMB) < 700
    for name, text in (("bomb.yaml", BOMB), ("loop.yaml", "name: x\nself: &s {again: *s}\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"{name}: invalid YAML .*aliases"):
            load_job(path)
    with pytest.raises(ConfigError, match="aliases"):
        load_job(JOB, ["train.steps=*x"])  # a --set value is YAML too
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text("applications: &apps\n  - name: a\nother: *apps\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_plan(str(serve_cfg))


def test_anchors_without_aliases_still_load(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(JOB.read_text().replace("train:", "train: &train", 1))
    assert load_job(path).train.steps > 0


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=.inf", "train.lr"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=10", "train.lr"),
        ("train.weight_decay=.inf", "train.weight_decay"),
        ("train.weight_decay=3", "train.weight_decay"),
        ("train.betas=[.nan, 0.9]", "train.betas.0"),
        ("train.betas=[0.9, 5]", "train.betas.1"),
        ("deepspeed.gradient_clipping=.inf", "deepspeed.gradient_clipping"),
        ("method.sample_guidance=.inf", "method.flow_matching.sample_guidance"),
    ],
)
def test_non_finite_and_out_of_range_numbers_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_job(JOB, [override])
    assert f"{JOB}: {field}:" in str(err.value)


def test_serve_limits_refuse_infinite_guidance(tmp_path):
    from twinflow.serve.config import parse_args

    for value in (float("inf"), float("nan"), 1e9):
        with pytest.raises(ValueError, match="max_guidance"):
            parse_args({"models": [{"id": "m", "path": str(tmp_path)}], "limits": {"max_guidance": value}})
