"""`twinflow serve --check`, and the shipped Serve config and KubeRay manifest (no Ray started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "serve" / "fashion_demo.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "twinflow-rayservice.yaml"


def _cli(argv):
    from twinflow.cli import main

    return main(argv)


def test_shipped_serve_configs_validate():
    from ray.serve.schema import ServeDeploySchema

    from twinflow.serve.config import DEPLOYMENT, parse_args

    files = sorted((REPO / "serve").glob("*.yaml"))
    assert DEMO in files
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first == f"# serve run serve/{f.name}", (f, first)
        schema = ServeDeploySchema.model_validate(yaml.safe_load(f.read_text()))
        assert schema.http_options.host == "127.0.0.1"
        for app in schema.applications:
            assert app.import_path == "twinflow.serve.app:build_app"
            parse_args(app.args)
            assert {d.name for d in app.deployments} <= {DEPLOYMENT}


def test_kuberay_manifest_embeds_the_demo_app():
    from ray.serve.schema import ServeDeploySchema

    from twinflow.serve.config import parse_args

    assert RAYSERVICE.read_text().splitlines()[0] == f"# kubectl apply -f {RAYSERVICE.relative_to(REPO)}"
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["kind"] == "RayService"
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    demo = ServeDeploySchema.model_validate(yaml.safe_load(DEMO.read_text()))
    (k_app,), (d_app,) = embedded.applications, demo.applications
    k_args, d_args = parse_args(k_app.args), parse_args(d_app.args)
    assert all(m.path.startswith("s3://") for m in k_args.models)
    assert [m.id for m in k_args.models] == [m.id for m in d_args.models]
    same = {"models", "cache_dir"}
    assert k_args.model_dump(exclude=same) == d_args.model_dump(exclude=same)
    assert [d.name for d in k_app.deployments] == [d.name for d in d_app.deployments]


def test_cli_check_on_a_config_and_an_export(tiny_exports, tmp_path, capsys):
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["applications"][0]["args"]["models"] = [
        {"id": "a", "path": str(tiny_exports["tiny"])},
        {"id": "b", "path": str(tiny_exports["tiny-edit"])},
    ]
    cfg["applications"][0]["args"]["default_model"] = "b"
    f = tmp_path / "app.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert _cli(["serve", str(f), "--check", "--set", "limits.max_nfe=4"]) == 0
    out = json.loads(capsys.readouterr().out)["twinflow"]
    assert [m["id"] for m in out] == ["a", "b"] and [m["default"] for m in out] == [False, True]
    assert out[0]["nfe"]["max"] == 4 and out[1]["tasks"] == ["generate", "edit"]
    assert _cli(["serve", str(tiny_exports["tiny"]), "--check"]) == 0
    (one,) = json.loads(capsys.readouterr().out)["twinflow"]
    assert one["id"] == "serve-test" and one["source"] == str(tiny_exports["tiny"].resolve())


def test_cli_errors_name_the_problem(tiny_exports, tmp_path, capsys):
    assert _cli(["serve", str(tmp_path / "missing"), "--check"]) == 2
    assert "no such export dir or config file" in capsys.readouterr().err
    assert _cli(["serve", str(tmp_path), "--check"]) == 1  # a dir that is no export
    assert "not a TwinFlow export" in capsys.readouterr().err
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["applications"][0]["args"]["batching"]["max_batch"] = 4
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(cfg))
    assert _cli(["serve", str(f), "--check"]) == 2
    assert "max_batch" in capsys.readouterr().err
    cfg["applications"][0]["args"]["batching"].pop("max_batch")
    cfg["applications"][0]["args"]["models"][0]["path"] = str(tmp_path / "nope")
    f.write_text(yaml.safe_dump(cfg))
    assert _cli(["serve", str(f), "--check"]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REPO / "runs/fashion_twinflow/export/twinflow.json").is_file(),
    reason="the demo checkpoint is made by `twinflow train jobs/fashion_twinflow.yaml`",
)
def test_demo_config_finds_the_demo_checkpoints(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    if not (REPO / "runs/fashion_base_fm/export/twinflow.json").is_file():
        pytest.skip("runs/fashion_base_fm/export is missing")
    assert _cli(["serve", str(DEMO), "--check"]) == 0
    out = json.loads(capsys.readouterr().out)["twinflow"]
    assert [m["method"] for m in out] == ["twinflow", "flow_matching"]
