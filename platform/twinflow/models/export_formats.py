"""The export formats `twinflow export` writes (`export_converters.py` writes them). Torch-free, so the CLI can
list them in `--help` without importing torch."""

from __future__ import annotations

FORMATS = ("diffusers", "diffusers_lora", "comfyui_lora")
