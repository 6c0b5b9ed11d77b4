"""Diffusers backbones wrapped as TwinFlow velocity models G(x, t, r, cond), the caption encoder, export.

Names are imported lazily: `twinflow.models.config` (the job YAML's `model:` section) must stay cheap
to import, while the generator pulls in diffusers and peft (seconds).
"""

from __future__ import annotations

from twinflow.lazy import lazy_names

_NAMES = {
    "ModelConfig": "twinflow.models.config",
    "LoraSettings": "twinflow.models.config",
    "TextEncoder": "twinflow.models.text_encoder",
    "default_model_dir": "twinflow.models.text_encoder",
    "TwinFlowGenerator": "twinflow.models.generator",
    "build_generator": "twinflow.models.generator",
    "apply_lora": "twinflow.models.lora",
    "disable_adapters": "twinflow.models.lora",
    "save_generator": "twinflow.models.export_writer",
    "load_generator": "twinflow.models.export_loader",
    "load_export_codec": "twinflow.models.export_loader",
    "LatentCodec": "twinflow.models.vae",
    "load_codec": "twinflow.models.vae",
    "get_family": "twinflow.models.registry",
    "family_names": "twinflow.models.presets",
    "get_preset": "twinflow.models.presets",
    "PRESETS": "twinflow.models.presets",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _NAMES)
