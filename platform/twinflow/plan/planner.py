"""A job YAML -> the memory table of its layouts and the cheapest one that fits a GPU size."""

from __future__ import annotations

from dataclasses import dataclass

from twinflow.method.groups import BatchLayout
from twinflow.plan.activations import load_fit
from twinflow.plan.counts import count_model
from twinflow.plan.memory import Estimate, Layout, Workload, estimate, forward_rows

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
_OFFLOADS = {
    0: [(False, False)],
    1: [(False, False), (True, False)],
    2: [(False, False), (True, False)],
    3: [(False, False), (True, False), (True, True)],
}


def workload(job) -> Workload:
    """What the job's sections say about memory (model built on the meta device)."""
    counts = count_model(job.model)
    teacher = getattr(job.method, "teacher", "online")
    edit = job.data.is_edit  # the reference image's tokens ride along
    grad_rows, nograd_rows, overlap_rows = forward_rows(
        job.method,
        job.train.micro_batch,
        conditional=job.data.embed_text,
        layout=BatchLayout(
            job.cluster.num_workers, job.train.micro_batch, job.deepspeed.gradient_accumulation_steps
        ),
    )
    return Workload(
        counts=counts,
        precision=job.deepspeed.precision,
        micro_batch=job.train.micro_batch,
        grad_rows=grad_rows,
        nograd_rows=nograd_rows,
        overlap_rows=overlap_rows,
        # a frozen teacher without LoRA is an average that is never updated (with LoRA: adapters off)
        emas=int(teacher == "ema")
        + int(teacher == "frozen" and job.model.lora is None)
        + int(job.train.sample_ema is not None),
        lora=job.model.lora is not None,
        tokens=counts.image_tokens * (2 if edit else 1) + counts.text_tokens,
        input_row=input_row_bytes(counts, job.deepspeed.precision, edit),
        activations=load_fit(job.model.family),
    )


def input_row_bytes(counts, precision: str, edit: bool) -> int:
    """One row of a model call's inputs: the state (fp32, as the objective holds it; twice for an
    edit's reference), the caption states at the training precision, the int64 mask."""
    c, h, w = counts.state_shape
    element = 2 if precision == "bf16" else 4
    states = counts.text_tokens * counts.text_input_width * element
    return 4 * c * h * w * (2 if edit else 1) + states + 8 * counts.text_tokens


def layouts(gpus: int, checkpointing: bool | None = None):
    """Every ZeRO stage and offload choice for `gpus` GPUs (both checkpointing settings unless fixed)."""
    for ckpt in (False, True) if checkpointing is None else (checkpointing,):
        for stage, offloads in _OFFLOADS.items():
            for opt, params in offloads:
                yield Layout(gpus, stage, opt, params, ckpt)


@dataclass(frozen=True)
class Plan:
    work: Workload
    capacity: int  # usable bytes per GPU (after the reserve)
    table: list[Estimate]  # the job's GPU count and checkpointing, every stage/offload
    cheapest: Estimate | None  # fewest GPUs, then least offload, then no checkpointing, lowest stage


def plan(job, gpu_bytes: int, gpus: int, reserve: int) -> Plan:
    work = workload(job)
    capacity = gpu_bytes - reserve
    table = [estimate(work, lay) for lay in layouts(gpus, job.model.gradient_checkpointing)]
    cheapest = None
    for n in GPU_COUNTS:
        fits = [e for e in (estimate(work, lay) for lay in layouts(n)) if e.peak <= capacity]
        if fits:
            cheapest = min(
                fits,
                key=lambda e: (e.layout.offload_level, e.layout.checkpointing, e.layout.zero_stage, e.peak),
            )
            break
    return Plan(work, capacity, table, cheapest)
