"""Load one local export folder back into modules exactly as `export_writer` saved them.

Finding an export (a local path or s3://, cached) is `twinflow.export_reader`'s job; this module takes
the folder it gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from twinflow.models.generator import TwinFlowGenerator
from twinflow.models.vae import LatentCodec


def load_generator(
    path: str | Path, torch_dtype: torch.dtype | None = None
) -> tuple[TwinFlowGenerator, dict[str, Any]]:
    """(generator in eval mode, metadata) from a `save_generator` directory; outputs match the saved model."""
    return TwinFlowGenerator.from_export(path, torch_dtype)


def load_export_codec(path: str | Path):
    """The VAE saved beside an export (None for pixel-space models)."""
    vae = Path(path) / "vae"
    return LatentCodec.from_pretrained(vae) if (vae / "config.json").is_file() else None
