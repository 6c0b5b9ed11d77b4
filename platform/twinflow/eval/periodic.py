"""The hook for training's periodic eval: the same metrics as `twinflow eval`, on the in-memory model.

    from twinflow.eval.periodic import dataset_of, periodic_metrics, reference_of

    ds = dataset_of(job.data.path, job.data.s3_endpoint)      # driver or worker; None for user folders
    metrics = periodic_metrics(engine.module, dataset=ds, reference=reference_of(job), prompts=job.eval.prompts,
                               cond=eval_cond, nfe=job.eval.nfe, method=job.method.name, device=device)
    # -> {"eval/fd_nfe1": ..., "eval/adherence_nfe1": ..., "eval/diversity_nfe1": ..., "eval/collapse_nfe1": ...,
    #     ..., "eval/fd_floor": ..., "eval/diversity_floor": ...}   ({} when ds is None)

The real images come from the job's own inputs only: `eval.reference` when the job names one, else
its `data.path` shards (their eval and train splits), so a job runs on any node that can read its
named paths (`check_reference` proves that before Ray starts, on the manifest the driver read once).
The judge's weights ship in the package.

Costs, for the tiny 28x28 model on one CPU core: the judge and the real reference load once per
process (reference features cached on disk after the first job, ~0.1 s to read); sampling is
prompts x images_per_prompt x sum(NFE) model forwards; judging 1,000 images takes ~0.1 s.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch

from twinflow import storage
from twinflow.config import ConfigError
from twinflow.data import shards
from twinflow.eval.datasets import SOURCE_TYPES, get_dataset, reference_manifest
from twinflow.eval.judges import load_judge
from twinflow.eval.metrics import evaluate_generator, real_reference
from twinflow.eval.sampling import resolve_sampler


def dataset_of(data_path: str, s3_endpoint: str | None = None) -> str | None:
    """The judge dataset of a shard folder (its manifest's source type), or None when no judge fits.
    Reads only the manifest's `source`, so any folder with a manifest.json naming one qualifies."""
    try:
        manifest = json.loads(storage.read_bytes(storage.join(data_path, "manifest.json"), s3_endpoint))
    except (OSError, ValueError):
        return None
    return SOURCE_TYPES.get((manifest.get("source") or {}).get("type"))


def judge_dataset(manifest: shards.Manifest | None) -> str | None:
    """The judge dataset of shards whose manifest the caller has read (None: none fits, or unreadable)."""
    return None if manifest is None else SOURCE_TYPES.get((manifest.source or {}).get("type"))


def reference_of(job: Any) -> tuple[str, str | None]:
    """(shards, endpoint) of a job's real reference images: `eval.reference`, else `data.path`."""
    return job.eval.reference or job.data.path, job.data.s3_endpoint


def uses_reference(job: Any, dataset: str | None) -> bool:
    """Whether the job's periodic eval will read real images (metrics on, prompts, a judge for its
    data: `dataset`, the judge of `data.path`)."""
    return bool(job.eval.metrics and job.eval.prompts) and dataset is not None


def check_reference(job: Any, dataset: str | None, manifest: shards.Manifest | None = None) -> None:
    """Driver side, before Ray starts: the shards periodic eval reads its real images from exist and
    hold an image_text eval and train split; else a ConfigError naming the field and what to pass.
    `dataset`: the judge of `data.path`; `manifest`: `data.path`'s, read by the caller (used when
    the reference is `data.path` itself)."""
    if not uses_reference(job, dataset):
        return
    data, endpoint = reference_of(job)
    field = "eval.reference" if job.eval.reference else "data.path"
    try:
        reference_manifest(data, endpoint, manifest=None if job.eval.reference else manifest)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{field}: {exc}; periodic eval (eval.metrics) needs real images: set eval.reference to shards "
            "with an eval and a train split (`twinflow data build` writes both), or pass --set eval.metrics=false"
        ) from None


def periodic_metrics(
    module: torch.nn.Module,
    *,
    dataset: str | None,
    reference: tuple[str, str | None] | None,
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
    """`evaluate_generator` with the judge of `dataset` ({} when None) and the cached real reference
    read from `reference` = (shards, endpoint) (`reference_of(job)`). Every rank must call it under
    ZeRO-3 (the forwards gather parameters); all ranks get the same numbers."""
    if dataset is None or not prompts:
        return {}
    if reference is None:
        raise ValueError("periodic metrics need the shards of their real images (reference_of(job))")
    judge = load_judge(dataset)
    dtype = next(module.parameters()).dtype
    if cond is not None:
        cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
    return evaluate_generator(
        module,
        list(prompts),
        list(nfe),
        judge,
        reference=real_reference(judge, *reference),
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
