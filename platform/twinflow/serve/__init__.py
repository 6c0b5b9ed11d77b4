"""Serving TwinFlow checkpoints over HTTP with Ray Serve (docs/serving.md).

- `twinflow.serve.app:build_app`: the application builder a Serve config YAML imports (serve/*.yaml);
- `twinflow.serve.engine`: the model side as plain torch (loading, batched deterministic sampling);
- `twinflow.serve.schemas`: the JSON API v1 request/response models;
- `twinflow.serve.openai_api`: OpenAI's Images API on the same deployment, translated onto its request path;
- `twinflow serve <export|config>`: the local default (twinflow.serve.cli).

Importing this package is cheap: Ray, torch and FastAPI load only with `app` / `engine`.
"""
