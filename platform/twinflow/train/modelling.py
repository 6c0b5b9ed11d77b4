"""From a job's sections to the pieces the worker loop needs: model, teacher, objective, grids, export."""

from __future__ import annotations

from pathlib import Path

import torch

from twinflow.eval.periodic import periodic_metrics, reference_of
from twinflow.export_reader import META_FILE, local_export
from twinflow.imaging import save_grid
from twinflow.method import build_objective as _build_objective
from twinflow.method.config import TwinFlowConfig, sample_guidance_of
from twinflow.method.sampler import sample_seeded, settings_for
from twinflow.models import build_generator
from twinflow.models.export_writer import save_generator
from twinflow.models.lora import apply_lora
from twinflow.models.streamed import load_streamed
from twinflow.models.vae import LatentCodec
from twinflow.train import averages, sharded_build
from twinflow.train.config import JobConfig
from twinflow.train.editing import export_metadata


def train_dtype(job: JobConfig) -> torch.dtype:
    return torch.bfloat16 if job.deepspeed.precision == "bf16" else torch.float32


def build_model(job: JobConfig, ds_cfg: dict | None = None) -> torch.nn.Module:
    """The backbone, loaded from `train.init_from` when set, THEN adapted with LoRA (base keys must match).

    Built in the training dtype (DeepSpeed would cast it anyway): the startup peak is the bf16 size.
    With a ZeRO-3 `ds_cfg` it is built partitioned (`twinflow.train.sharded_build`): each rank holds
    its share of the weights plus the one module being built or loaded."""
    dtype = train_dtype(job)
    with sharded_build.partitioned_construction(ds_cfg, dtype):
        model = build_generator(job.model.model_copy(update={"lora": None}), dtype=dtype)
    if job.train.init_from:
        source = local_export(job.train.init_from, job.output.s3_endpoint)
        if not (source / META_FILE).is_file():  # a folder of ours, before any weights are looked for
            raise FileNotFoundError(f"{job.train.init_from}: not a TwinFlow export (no {META_FILE})")
        load_streamed(model, source, f"train.init_from {job.train.init_from}")
    if job.model.lora is not None:
        apply_lora(model, job.model.lora)
    return model


def build_averages(job: JobConfig, engine) -> averages.Averages:
    """The teacher and the optional sampling EMA (`train.sample_ema`) on the training module itself
    (`twinflow.train.averages`): built after DeepSpeed wrapped it (`engine`; a plain module in
    process), so an average is the fp32 adapter of a LoRA job or each rank's fp32 partition of a full
    one (on the host when the job offloads), never a whole copy of the generator per GPU."""
    module = getattr(engine, "module", engine)
    method = job.method
    return averages.build(
        module,
        teacher_mode=getattr(method, "teacher", "online"),
        teacher_decay=getattr(method, "ema_decay", 0.99),
        sample_decay=job.train.sample_ema,
        release=averages.zero3_release(engine),
        host=job.deepspeed.offload_optimizer or job.deepspeed.offload_params,
    )


def copies_made(job: JobConfig) -> int:
    """Averages of the generator `build_averages` keeps: an EMA teacher, a frozen teacher without LoRA
    (with LoRA it is the model with adapters off), the sampling EMA. Each is an fp32 LoRA adapter plus
    the trained E2 and text projection (LoRA), or fp32 1/world of the trainable weights per rank."""
    teacher = getattr(job.method, "teacher", "online")
    n = int(teacher == "ema") + int(teacher == "frozen" and job.model.lora is None)
    return n + int(job.train.sample_ema is not None)


def build_objective(job: JobConfig):
    return _build_objective(job.method)


@torch.no_grad()
def sample_grid(
    job: JobConfig,
    module: torch.nn.Module,
    eval_cond: dict[str, torch.Tensor],
    path: Path,
    *,
    rank: int,
    null_cond: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every rank samples (ZeRO-3 forwards need all ranks); rank 0 writes one row per NFE."""
    n = job.eval.images_per_prompt
    cond = {k: v.repeat_interleave(n, 0) for k, v in eval_cond.items()}
    was_training = module.training
    module.eval()
    guidance = sample_guidance_of(job.method)
    rows = [
        sample_seeded(
            module,
            cond,
            settings_for(job.method.name, nfe, guidance=guidance),
            job.eval.seed,
            null_cond=null_cond if guidance else None,
        )
        for nfe in job.eval.nfe
    ]
    module.train(was_training)
    if rank == 0:
        codec = grid_codec(module)
        if codec is not None:  # a latent model's rows are latents: the job's VAE makes them images
            rows = [codec.to(row.device).decode(row.float()) for row in rows]
        save_grid(rows, [f"{nfe} NFE" for nfe in job.eval.nfe], path)


_CODECS: dict[str, LatentCodec] = {}


def grid_codec(module: torch.nn.Module) -> LatentCodec | None:
    """The VAE that decodes a latent model's samples (rank 0, loaded at the first grid and kept): the
    workers of a job on a latent cache never load it for training, only to draw its grids."""
    latent = getattr(module, "latent", None)
    if not latent:
        return None
    path = str(latent["vae_path"])
    if path not in _CODECS:
        _CODECS[path] = LatentCodec.from_pretrained(path)
    return _CODECS[path]


def eval_metrics(
    job: JobConfig,
    module: torch.nn.Module,
    eval_cond: dict[str, torch.Tensor],
    *,
    device: torch.device,
    dataset: str | None,
    null_cond: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Judge-based metrics per NFE (`twinflow.eval`) on the in-memory model; {} when no judge fits the
    data (`dataset`: the judge the driver found in the data's manifest, `ResolvedJob.judge`) or
    `eval.metrics` is off. Every rank calls this (ZeRO-3 forwards gather on all ranks)."""
    if not job.eval.metrics or not job.eval.prompts:
        return {}
    was_training = module.training
    module.eval()
    try:
        return periodic_metrics(
            module,
            dataset=dataset,
            reference=reference_of(job),
            prompts=job.eval.prompts,
            cond=eval_cond,
            nfe=job.eval.nfe,
            method=job.method.name,
            images_per_prompt=job.eval.metric_images_per_prompt,
            seed=job.eval.seed,
            device=device,
            guidance=sample_guidance_of(job.method),
            null_cond=null_cond,
        )
    finally:
        module.train(was_training)


def export(job: JobConfig, module: torch.nn.Module, out_dir: Path, *, steps: int) -> Path:
    meta = {
        "method": job.method.name,
        "job": job.name,
        "steps": steps,
        "method_config": job.method.model_dump(by_alias=True),
        **realised_split(job),
        **export_metadata(job),
    }
    return save_generator(module, out_dir, meta)


def realised_split(job: JobConfig) -> dict:
    """The TwinFlow group split every optimizer step trained on (rows of the global batch per group),
    recorded in the export beside the lambda it realises; {} for objectives without groups."""
    if not isinstance(job.method, TwinFlowConfig):
        return {}
    split = job.method.split(job.global_batch)
    return {
        "group_split": {**split.as_dict(), "global_batch": job.global_batch},
        "lambda_realised": (split.size("e2e") + split.size("adv")) / split.batch_size,
    }
