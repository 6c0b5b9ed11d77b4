"""YAML loading: every error names the file and the field; overrides keep their YAML types."""

from __future__ import annotations

import pytest
from pydantic import Field

from twinflow.config import ConfigError, StrictModel, apply_overrides, load_config, parse_override


class Inner(StrictModel):
    lr: float = Field(1e-4, gt=0)
    steps: int = 10


class Outer(StrictModel):
    name: str
    train: Inner = Inner()


def write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_loads_and_applies_overrides(tmp_path):
    p = write(tmp_path, "name: a\ntrain:\n  lr: 0.001\n")
    cfg = load_config(p, Outer, ["train.steps=25", "train.lr=2e-3"])
    assert cfg.train.steps == 25 and cfg.train.lr == pytest.approx(2e-3)


def test_error_names_file_and_field(tmp_path):
    p = write(tmp_path, "name: a\ntrain:\n  lr: -1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, Outer)
    assert str(exc.value).startswith(f"{p}: train.lr: ")
    assert "greater than 0" in str(exc.value)


def test_unknown_field_is_an_error(tmp_path):
    p = write(tmp_path, "name: a\ntrain:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown field"):
        load_config(p, Outer)


def test_invalid_yaml_reports_line(tmp_path):
    p = write(tmp_path, "name: a\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line \d+"):
        load_config(p, Outer)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml", Outer)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"), Outer)


@pytest.mark.parametrize(
    "text,path,value",
    [
        ("method.lambda=0.33", ["method", "lambda"], 0.33),
        ("train.steps=10", ["train", "steps"], 10),
        ("eval.nfe=[1, 2]", ["eval", "nfe"], [1, 2]),
        ("cluster.address=null", ["cluster", "address"], None),
        ("name=demo", ["name"], "demo"),
    ],
)
def test_parse_override_types(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize("bad", ["no_equals", "=3", "a..b=1"])
def test_bad_overrides(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])
