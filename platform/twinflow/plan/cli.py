"""`twinflow plan job.yaml`: per-GPU memory of every ZeRO/offload layout, and the cheapest that fits."""

from __future__ import annotations

import argparse
import sys

from twinflow.plan.gpus import GIB, GPUS_MIB, gpu_memory, parse_size

_COLUMNS = ("weights", "gradients", "optimizer", "ema", "gathered", "buffers", "activations", "nograd_peak")


def _gib(n: int) -> str:
    return f"{n / GIB:8.1f}"


def render(result, gpu_label: str) -> str:
    from twinflow.plan.memory import Estimate

    w = result.work
    c = w.counts
    lines = [
        f"model: {c.total:,} parameters ({c.trainable:,} trainable), {c.layers} blocks x {c.width} "
        f"({c.heads} heads), largest block {c.largest_layer:,}",
        f"step: micro-batch {w.micro_batch}, {w.tokens} tokens/row, forward with gradient {w.grad_rows} rows, "
        f"largest no-grad forward {w.nograd_rows} rows (and {w.overlap_rows} while its activations are held), "
        f"{w.emas} fp32 average(s) ({'second adapter + 1/world of E2' if w.lora else '1/world per rank'}), "
        f"precision {w.precision}",
        *(f"config {line}" for line in c.configs),
        f"GPU: {gpu_label}, usable {result.capacity / GIB:.1f} GiB after the reserve; figures in GiB per GPU",
        "",
        f"{'layout':50s}"
        + "".join(f"{h[:8]:>9s}" for h in (*_COLUMNS, "total", "startup", "host"))
        + "  fits",
    ]

    def row(e: Estimate) -> str:
        cells = [getattr(e, k) for k in _COLUMNS] + [e.training, e.startup, e.cpu]
        return (
            f"{e.layout.label():50s}"
            + "".join(f" {_gib(v)}" for v in cells)
            + ("  yes" if e.peak <= result.capacity else "  NO")
        )

    lines += [row(e) for e in result.table]
    lines.append("")
    if result.cheapest is None and any(e.training <= result.capacity < e.startup for e in result.table):
        lines.append(
            "no layout fits because of the startup peak: below ZeRO-3 the worker builds the whole "
            "generator (in the training precision) on each GPU before DeepSpeed shards it (startup "
            "column; ZeRO-3 builds it partitioned); training itself would fit"
        )
    elif result.cheapest is None:
        lines.append(
            "no layout up to 128 GPUs fits: lower micro_batch or resolution, use LoRA, or a larger GPU"
        )
    else:
        lines.append(f"cheapest layout that fits: {result.cheapest.layout.label()}")
        lines.append(row(result.cheapest))
    return "\n".join(lines)


def group_split_line(job) -> str | None:
    """TwinFlow's group split every optimizer step trains (over the global batch), as the job runs it."""
    from twinflow.train.modelling import realised_split

    found = realised_split(job)
    if not found:
        return None
    g = dict(found["group_split"])
    rows = g.pop("global_batch")
    return (
        f"TwinFlow groups per optimizer step ({rows} rows = {job.cluster.num_workers} workers x "
        f"{job.train.micro_batch} x {job.deepspeed.gradient_accumulation_steps} accumulation): "
        + ", ".join(f"{k} {v}" for k, v in g.items())
        + f"; lambda {getattr(job.method, 'lambda_', 0):g} realised as {found['lambda_realised']:.3f}"
    )


def _plan(args: argparse.Namespace) -> int:
    from twinflow.plan.planner import plan
    from twinflow.train.config import load_job

    job = load_job(args.job, overrides=args.set)
    if args.gpu_mem:
        gpu_bytes, label = parse_size(args.gpu_mem), args.gpu_mem
    else:
        gpu_bytes, label = gpu_memory(args.gpu), args.gpu
    gpus = args.gpus or job.cluster.num_workers
    try:
        result = plan(job, gpu_bytes, gpus, parse_size(args.reserve))
    except (FileNotFoundError, ValueError) as exc:  # a missing config.json, a batch too small for TwinFlow
        print(f"error: {args.job}: {exc}", file=sys.stderr)
        return 2
    print(render(result, label))
    split = group_split_line(job)
    if split:
        print(split)
    fits = any(e.peak <= result.capacity for e in result.table)
    return 0 if fits else 3


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="will a job fit its GPUs? per-GPU memory of every ZeRO stage/offload layout (no weights loaded)",
    )
    p.add_argument("job", help="a job YAML, e.g. jobs/qwen_image_lora.yaml")
    p.add_argument("--gpu", default="h100-80g", help=f"GPU by name: {', '.join(sorted(GPUS_MIB))}")
    p.add_argument("--gpu-mem", default=None, help="GPU memory instead of --gpu, e.g. 80GiB or 141GB")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the table (default: cluster.num_workers)")
    p.add_argument(
        "--reserve", default="2GiB", help="per GPU, kept free for the CUDA context, NCCL and fragmentation"
    )
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a job field")
    p.set_defaults(func=_plan)
