"""Load a YAML file into its pydantic model, failing with one message that names the file and field.

Every YAML kind (job, pipeline, sweep) goes through `load_config`, so a user sees the same error shape
whatever they got wrong: ``jobs/x.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file (or an override) is invalid; the message names the file and the field."""


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors (a typo must never be silently ignored), and
    so is a non-finite number (`.inf`, `.nan`) in any float field, whatever its bounds say."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False, allow_inf_nan=False)


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases: a few hundred bytes of nested `*a` references expand into
    billions of nodes once copied, and a self-referencing one recurses forever."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"YAML aliases (*{event.anchor}) are not allowed in config files",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def safe_load(text: str) -> Any:
    """yaml.safe_load without aliases (anchors alone are harmless and stay allowed)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value read as YAML, so numbers, bools and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected FIELD=VALUE, e.g. method.lambda=0.33")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty field name")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def set_field(data: dict[str, Any], path: str | list[str], value: Any) -> None:
    """Set the dotted field `a.b.c` (or its parts) in a nested dict in place, creating sections;
    a non-mapping on the way is a ConfigError."""
    parts = path.split(".") if isinstance(path, str) else list(path)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts)}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _deep_copy(value)


def with_fields(data: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with each dotted field of ``fields`` set (a sweep's overrides and trial values)."""
    out: dict[str, Any] = _deep_copy(data)
    for key, value in fields.items():
        set_field(out, key, value)
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=value`` override set (creating sections as needed)."""
    out: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_field(out, path, value)
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, a parse error or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def format_validation_error(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        lines.append(f"{source}: {field}: {msg}")
    return "\n".join(lines)


def validate(model: type[M], data: Mapping[str, Any], source: str) -> M:
    """Validate ``data`` into ``model``; errors become one ConfigError naming ``source`` and fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None


def load_config(path: str | Path, model: type[M], overrides: Iterable[str] = ()) -> M:
    """Load ``path`` as ``model`` with ``--set``-style overrides applied before validation."""
    data = apply_overrides(read_yaml(path), overrides)
    return validate(model, data, str(path))
