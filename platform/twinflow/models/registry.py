"""Backbone families: which ones exist, which one a transformer directory holds, and the family object
(the interface in twinflow.models.family). Everything else (the generator, LoRA, export) is
family-agnostic. Family modules are imported on first use: diffusers takes seconds to import and
config validation must not pay for it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from twinflow.models.family import Family, transformer_dir
from twinflow.models.presets import Preset, check_family, family_names, get_preset

_FAMILY_MODULES = {
    "qwen_image": "twinflow.models.qwen_image",
    "sana": "twinflow.models.sana",
}
_FAMILY_OF_CLASS = {
    "QwenImageTransformer2DModel": "qwen_image",
    "SanaTransformer2DModel": "sana",
}


def family_of(path: str | Path) -> str:
    """The family of a diffusers transformer directory, from its config's `_class_name`."""
    root = transformer_dir(path)
    cls = json.loads((root / "config.json").read_text()).get("_class_name")
    if cls not in _FAMILY_OF_CLASS:
        raise ValueError(
            f"{root}: {cls!r} is not a supported backbone; supported: "
            f"{', '.join(f'{c} ({f})' for c, f in sorted(_FAMILY_OF_CLASS.items()))}"
        )
    return _FAMILY_OF_CLASS[cls]


def get_family(name: str) -> Family:
    """The family object; an unknown name is an error that lists the known families."""
    check_family(name)
    module = importlib.import_module(_FAMILY_MODULES[name])
    return module.FAMILY


__all__ = ["Family", "Preset", "family_names", "family_of", "get_family", "get_preset", "transformer_dir"]
