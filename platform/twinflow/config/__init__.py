"""Config loading shared by every YAML kind (job, pipeline, sweep): one pydantic model per kind."""

from twinflow.config.loading import ConfigError, StrictModel, apply_overrides, load_config, parse_override

__all__ = ["ConfigError", "StrictModel", "apply_overrides", "load_config", "parse_override"]
