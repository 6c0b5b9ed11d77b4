"""`twinflow serve <export dir | Serve config YAML>`: run the HTTP API and playground locally.

- an export dir (e.g. runs/fashion_twinflow/export): one model, default deployment options;
- a Serve config YAML (e.g. serve/fashion_demo.yaml): the same applications, args and per-deployment
  options (`deployments:`) that `serve run <file>` would deploy.

It binds 127.0.0.1 unless --host (or the YAML's http_options.host) says otherwise. `--check` only
validates and prints the models (no Ray). Mounted by `twinflow.cli` through `add_commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

APP_IMPORT_PATH = "twinflow.serve.app:build_app"


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve checkpoints over HTTP (Ray Serve) with a browser playground",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target", help="a TwinFlow export dir, or a Serve config YAML such as serve/fashion_demo.yaml"
    )
    p.add_argument(
        "--host", default=None, help="bind address (default 127.0.0.1, or the YAML's http_options.host)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="port (default 8000, or the YAML's http_options.port)"
    )
    p.add_argument(
        "--id", default=None, help="model id for an export dir (default: its job name, else the dir name)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override an app arg, e.g. --set batching.max_batch_images=1 (repeatable)",
    )
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument(
        "--check", action="store_true", help="validate, print the models as JSON and exit (no Ray)"
    )
    p.add_argument(
        "--non-blocking", action="store_true", help="deploy and return instead of serving until Ctrl-C"
    )
    p.set_defaults(func=run_command)


def _export_plan(path: Path, model_id: str | None) -> dict[str, Any]:
    from twinflow.models.export_layout import read_metadata
    from twinflow.serve.config import MODEL_ID_RE

    meta = read_metadata(path)
    mid = model_id or str(meta.get("job") or path.resolve().name)
    if not MODEL_ID_RE.match(mid):
        mid = "model"
    return {
        "http_options": {},
        "proxy_location": None,
        "applications": [
            {
                "name": "twinflow",
                "route_prefix": "/",
                "import_path": APP_IMPORT_PATH,
                "args": {"models": [{"id": mid, "path": str(path)}]},
                "deployments": [],
            }
        ],
    }


def load_plan(target: str, model_id: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The target as {http_options, proxy_location, applications: [{name, route_prefix, args, deployments}]}."""
    import yaml

    from twinflow.config import ConfigError, apply_overrides
    from twinflow.config.loading import safe_load
    from twinflow.serve.config import parse_args

    path = Path(target)
    if path.is_dir():
        plan = _export_plan(path, model_id)
    elif path.is_file():
        try:
            data = safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{target}: not valid YAML: {exc}") from None
        if not isinstance(data, dict) or not data.get("applications"):
            raise ConfigError(f"{target}: expected a Serve config with an 'applications:' list")
        plan = {
            "http_options": dict(data.get("http_options") or {}),
            "proxy_location": data.get("proxy_location"),
            "applications": [],
        }
        for app in data["applications"]:
            if app.get("import_path") != APP_IMPORT_PATH:
                raise ConfigError(
                    f"{target}: application {app.get('name')!r} imports {app.get('import_path')!r}; "
                    f"twinflow serve runs {APP_IMPORT_PATH} (use `serve run` for others)"
                )
            plan["applications"].append(
                {
                    "name": app.get("name", "default"),
                    "route_prefix": app.get("route_prefix", "/"),
                    "args": app.get("args") or {},
                    "deployments": app.get("deployments") or [],
                }
            )
            if app.get("runtime_env"):
                log.warning(
                    "%s: twinflow serve ignores runtime_env of %r (use `serve run` for it)",
                    target,
                    app.get("name"),
                )
    else:
        raise ConfigError(f"{target}: no such export dir or config file")
    for app in plan["applications"]:
        if overrides:
            app["args"] = apply_overrides(app["args"], overrides)
        try:
            parse_args(app["args"])
        except Exception as exc:
            raise ConfigError(f"{target}: application {app['name']!r}: {exc}") from None
    return plan


def run_command(args: argparse.Namespace) -> int:
    from twinflow.config import ConfigError

    try:
        plan = load_plan(args.target, args.id, args.set)
        if args.check:
            from twinflow.serve.app import describe
            from twinflow.serve.config import parse_args

            out = {a["name"]: describe(parse_args(a["args"]).resolved()) for a in plan["applications"]}
            print(json.dumps(out, indent=2))
            return 0
        return serve_plan(
            plan, host=args.host, port=args.port, address=args.address, block=not args.non_blocking
        )
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def check_plan_exposure(plan: dict[str, Any], host: str) -> None:
    """ConfigError unless every application has a token or says `auth: none` when `host` is not loopback."""
    import os

    from twinflow.config import ConfigError
    from twinflow.serve.config import parse_args
    from twinflow.serve.exposure import ExposureError, check_exposure

    for app in plan["applications"]:
        cfg = parse_args(app["args"])
        token = os.environ.get(cfg.auth_token_env) if cfg.auth_token_env else None
        try:
            check_exposure(host, cfg.auth, token, f"application {app['name']!r}")
        except ExposureError as exc:
            raise ConfigError(str(exc)) from None


def serve_plan(
    plan: dict[str, Any],
    *,
    host: str | None = None,
    port: int | None = None,
    address: str | None = None,
    block: bool = True,
) -> int:
    import ray
    from ray import serve

    from twinflow.serve.app import build_application

    http = dict(plan.get("http_options") or {})
    http["host"] = host or http.get("host") or "127.0.0.1"
    http["port"] = int(port or http.get("port") or 8000)
    check_plan_exposure(plan, http["host"])  # before Ray starts: an open non-loopback bind is refused
    if not ray.is_initialized():
        ray.init(address=address, namespace="serve")
    start_kwargs: dict[str, Any] = {"http_options": http}
    if plan.get("proxy_location"):
        start_kwargs["proxy_location"] = plan["proxy_location"]
    serve.start(**start_kwargs)
    for app in plan["applications"]:
        options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app["deployments"]}
        serve.run(
            build_application(app["args"], deployment_options=options),
            name=app["name"],
            route_prefix=app["route_prefix"],
            blocking=False,
        )
        print(
            f"twinflow serve: {app['name']} at http://{http['host']}:{http['port']}{app['route_prefix']} "
            f"(playground), API under {app['route_prefix'].rstrip('/')}/v1/",
            flush=True,
        )
    if not block:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("twinflow serve: shutting down", flush=True)
        serve.shutdown()
    return 0
