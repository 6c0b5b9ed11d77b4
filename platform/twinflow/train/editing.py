"""Edit jobs: a job whose `data.text_column` is `instruction` trains an image editor.

The model sees the source image as reference tokens appended after the target tokens (the
Qwen-Image-Edit layout, `cond["ref_image"]`, see `twinflow.models.qwen_image`) and the instruction as
its text; the loss is on the exactly edited target (`image`). Edit pairs have one right answer per
(source, instruction), so these jobs train without a null condition: condition dropout and baked-in
CFG are refused up front instead of failing inside the objective, whose null condition has no
reference image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from twinflow.train.config import JobConfig

EDIT_TASKS = ["generate", "edit"]


def add_reference(
    cond: dict[str, torch.Tensor], batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`cond` plus the batch's source images as `ref_image` (B, C, H, W) in [-1, 1]."""
    if "source_image" not in batch:
        raise ValueError(
            "an edit job (data.text_column: instruction) needs edit-pair shards with a source_image column"
        )
    cond["ref_image"] = torch.as_tensor(batch["source_image"]).to(device, dtype)
    return cond


def export_metadata(job: JobConfig) -> dict[str, Any]:
    """Extra `twinflow.json` keys: an editor declares `tasks` (serving's /v1/edit reads it) and its data."""
    if not job.data.is_edit:
        return {}
    return {"tasks": list(EDIT_TASKS), "edit_data": job.data.path}
