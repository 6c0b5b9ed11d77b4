"""The hook for training's periodic eval: the same metrics as `twinflow eval`, on the in-memory model.

    from twinflow.eval.periodic import dataset_of, periodic_metrics

    ds = dataset_of(job.data.path, job.data.s3_endpoint)      # driver or worker; None for user folders
    metrics = periodic_metrics(engine.module, dataset=ds, prompts=job.eval.prompts, cond=eval_cond,
                               nfe=job.eval.nfe, method=job.method.name, device=device)
    # -> {"eval/fd_nfe1": ..., "eval/adherence_nfe1": ..., "eval/diversity_nfe1": ..., "eval/collapse_nfe1": ...,
    #     ..., "eval/fd_floor": ..., "eval/diversity_floor": ...}   ({} when ds is None)

Costs, for the tiny 28x28 model on one CPU core: the judge and the real reference load once per
process (reference features cached on disk after the first job, ~0.1 s to read); sampling is
prompts x images_per_prompt x sum(NFE) model forwards; judging 1,000 images takes ~0.1 s.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch

from twinflow import storage
from twinflow.eval.datasets import SOURCE_TYPES, get_dataset
from twinflow.eval.judges import load_judge
from twinflow.eval.metrics import evaluate_generator, real_reference
from twinflow.eval.sampling import resolve_sampler


def dataset_of(data_path: str, s3_endpoint: str | None = None) -> str | None:
    """The judge dataset of a shard folder (its manifest's source type), or None when no judge fits."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(data_path, "manifest.json"), s3_endpoint))
    except (OSError, ValueError):
        return None
    return SOURCE_TYPES.get((manifest.get("source") or {}).get("type"))


def periodic_metrics(
    module: torch.nn.Module,
    *,
    dataset: str | None,
    prompts: Sequence[str],
    cond: Mapping[str, torch.Tensor] | None,
    nfe: Sequence[int],
    method: str | None,
    images_per_prompt: int = 32,
    seed: int = 1234,
    device: Any = None,
    batch_size: int = 128,
    guidance: float = 0.0,
    null_cond: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """`evaluate_generator` with the judge and cached real reference of `dataset` ({} when None).
    Every rank must call it under ZeRO-3 (the forwards gather parameters); all ranks get the same numbers."""
    if dataset is None or not prompts:
        return {}
    judge = load_judge(dataset)
    dtype = next(module.parameters()).dtype
    if cond is not None:
        cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
    return evaluate_generator(
        module,
        list(prompts),
        list(nfe),
        judge,
        reference=real_reference(judge),
        cond=cond,
        images_per_prompt=images_per_prompt,
        sampler=resolve_sampler("auto", method),  # flow matching: its ODE; TwinFlow: its presets
        seed=seed,
        device=device,
        batch_size=batch_size,
        guidance=guidance,
        null_cond=null_cond,
    )


def check_prompts(dataset: str | None, prompts: Sequence[str]) -> None:
    """Fail before training starts when an eval prompt names no class of the dataset (driver side)."""
    if dataset is None:
        return
    get_dataset(dataset).classes_of(list(prompts))
