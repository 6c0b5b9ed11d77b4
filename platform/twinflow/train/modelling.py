"""From a job's sections to the pieces the worker loop needs: model, teacher, objective, grids, export."""

from __future__ import annotations

from pathlib import Path

import torch

from twinflow.eval.periodic import dataset_of, periodic_metrics, reference_of
from twinflow.exports import open_export
from twinflow.imaging import save_grid
from twinflow.method import Teacher
from twinflow.method import build_objective as _build_objective
from twinflow.method.conditioning import cond_to
from twinflow.method.config import TwinFlowConfig, sample_guidance_of
from twinflow.method.ema import EMA
from twinflow.method.sampler import renoise_generator, sample, seeded_noise, settings_for
from twinflow.models import build_generator
from twinflow.models.export import save_generator
from twinflow.models.lora import apply_lora, disable_adapters
from twinflow.models.time_embed import SIGN_NAME
from twinflow.train.config import JobConfig
from twinflow.train.editing import export_metadata


def train_dtype(job: JobConfig) -> torch.dtype:
    return torch.bfloat16 if job.deepspeed.precision == "bf16" else torch.float32


def build_model(job: JobConfig) -> torch.nn.Module:
    """The backbone, loaded from `train.init_from` when set, THEN adapted with LoRA (base keys must match).

    Built in the training dtype (DeepSpeed would cast it anyway): the startup peak is the bf16 size."""
    model = build_generator(job.model.model_copy(update={"lora": None}), dtype=train_dtype(job))
    if job.train.init_from:
        base = open_export(job.train.init_from, job.output.s3_endpoint).generator()
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        # A "mirror" fake branch fine-tuned from a "signed" base: its sign embedding starts from its
        # zero gate (the fake branch equals the real one), so those keys may be absent from the base.
        missing = [k for k in missing if f".{SIGN_NAME}." not in k]
        if unexpected or missing:
            raise ValueError(
                f"train.init_from {job.train.init_from}: weights do not match model "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
            )
    if job.model.lora is not None:
        apply_lora(model, job.model.lora)
    return model


def build_teacher(job: JobConfig, model: torch.nn.Module) -> Teacher:
    """The objective's own teacher (online for flow matching); a frozen teacher of a LoRA model is the
    base with the adapters switched off, so no second copy of the weights is kept."""
    adapters_off = None
    if (
        isinstance(job.method, TwinFlowConfig)
        and job.method.teacher == "frozen"
        and job.model.lora is not None
    ):
        adapters_off = lambda: disable_adapters(model)  # noqa: E731
    return build_objective(job).make_teacher(model, adapters_off)


class Averages:
    """The teacher and the optional sampling EMA (`train.sample_ema`), checkpointed together: the
    teacher's state dict gains a `sample_ema` entry, which `Teacher.load_state_dict` ignores."""

    def __init__(self, teacher: Teacher, sample_ema: EMA | None) -> None:
        self.teacher = teacher
        self.sample_ema = sample_ema

    def sampling_module(self, online: torch.nn.Module) -> torch.nn.Module:
        """The weights grids, evaluation and the export use."""
        return self.sample_ema.module if self.sample_ema is not None else online

    def state_dict(self) -> dict:
        state = self.teacher.state_dict()
        if self.sample_ema is not None:
            state["sample_ema"] = self.sample_ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state)
        if self.sample_ema is not None:
            if "sample_ema" not in state:
                raise ValueError(
                    "the checkpoint holds no sampling EMA but train.sample_ema is set; "
                    "resume with the job's original settings or start over with --fresh"
                )
            self.sample_ema.load_state_dict(state["sample_ema"])


def build_averages(job: JobConfig, model: torch.nn.Module) -> Averages:
    """Teacher + sampling EMA; both copy the model as it is now (build them before DeepSpeed shards it).

    Their copies are fp32 (a bf16 EMA rounds away steps of (1 - d) * delta): a bf16 model is cast to
    fp32 while they are made, then back (bf16 -> fp32 -> bf16 is exact); `twinflow plan` counts it."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32 and copies_made(job):
        model.float()
    try:
        sample_ema = EMA(model, job.train.sample_ema) if job.train.sample_ema else None
        return Averages(build_teacher(job, model), sample_ema)
    finally:
        model.to(dtype)


def copies_made(job: JobConfig) -> int:
    """Deep copies of the generator `build_averages` makes: an EMA teacher, a frozen teacher without
    LoRA (with LoRA it is the model with adapters off), the sampling EMA."""
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
    device: torch.device,
    dtype: torch.dtype,
    null_cond: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every rank samples (ZeRO-3 forwards need all ranks); rank 0 writes one row per NFE."""
    n = job.eval.images_per_prompt
    cond = {k: v.to(device).repeat_interleave(n, 0) for k, v in eval_cond.items()}
    cond["text_states"] = cond["text_states"].to(dtype)
    batch = cond["text_states"].shape[0]
    noise = seeded_noise(batch, tuple(module.sample_shape), job.eval.seed).to(device, dtype)
    was_training = module.training
    module.eval()
    guidance = sample_guidance_of(job.method)
    if guidance and null_cond is not None:
        null_cond = cond_to(null_cond, device, dtype)
    rows = [
        sample(
            module,
            noise,
            cond,
            settings=settings_for(job.method.name, nfe, guidance=guidance),
            null_cond=null_cond,
            generator=renoise_generator(job.eval.seed, device),
        )
        for nfe in job.eval.nfe
    ]
    module.train(was_training)
    if rank == 0:
        save_grid(rows, [f"{nfe} NFE" for nfe in job.eval.nfe], path)


def eval_metrics(
    job: JobConfig,
    module: torch.nn.Module,
    eval_cond: dict[str, torch.Tensor],
    *,
    device: torch.device,
    null_cond: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Judge-based metrics per NFE (`twinflow.eval`) on the in-memory model; {} when no judge fits the
    data or `eval.metrics` is off. Every rank calls this (ZeRO-3 forwards gather on all ranks)."""
    if not job.eval.metrics or not job.eval.prompts:
        return {}
    was_training = module.training
    module.eval()
    try:
        return periodic_metrics(
            module,
            dataset=dataset_of(job.data.path, job.data.s3_endpoint),
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
        **export_metadata(job),
    }
    return save_generator(module, out_dir, meta)
