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


RAYJOB = CLUSTER / "kuberay" / "twinflow-rayjob.yaml"


def test_kuberay_rayjob_runs_a_shipped_job_on_enough_gpus():
    from twinflow.train.config import load_job

    text = RAYJOB.read_text()
    assert text.startswith(f"# kubectl apply -f cluster/kuberay/{RAYJOB.name}")
    doc = yaml.safe_load(text)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert doc["metadata"]["name"] and spec["shutdownAfterJobFinishes"] is True
    cmd = spec["entrypoint"].split()
    assert cmd[:2] == ["twinflow", "train"] and "--address" in cmd
    job = load_job(Path(__file__).resolve().parents[2] / cmd[2])  # the job YAML exists and validates
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert gpus >= job.cluster.num_workers * job.cluster.gpus_per_worker
    # the same command is what the header documents for `ray job submit`
    assert spec["entrypoint"] in text.split("ray job submit", 1)[1]
