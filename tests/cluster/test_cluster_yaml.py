"""Every Ray cluster-launcher YAML in cluster/ passes Ray's own schema and says how to launch it."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
LAUNCHER_YAMLS = sorted(CLUSTER.glob("*.yaml"))


def _validate(config: dict) -> None:
    """What `ray up` does first: fill the provider's defaults, then check against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


def test_launcher_yamls_exist():
    assert any(p.name == "local.yaml" for p in LAUNCHER_YAMLS)


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_valid(path):
    assert path.read_text().startswith(f"# ray up cluster/{path.name}")
    config = yaml.safe_load(path.read_text())
    _validate(config)
    # nodes install the project the same way the README does
    assert any("scripts/setup.sh" in c for c in config.get("setup_commands", []))


def test_schema_rejects_a_broken_launcher_yaml():
    config = yaml.safe_load((CLUSTER / "local.yaml").read_text())
    config["idle_timeout_minutes"] = "five"
    with pytest.raises(jsonschema.ValidationError, match="five"):
        _validate(config)
