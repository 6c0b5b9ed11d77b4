"""Cost of one TwinFlow training step relative to one flow-matching step (issue 2's benchmark).

Same model (tiny Qwen-Image-class backbone, 28x28 gray, MiniLM-sized text states), same batch, one CPU
thread, AdamW. Time: median over timed steps after warm-up. Memory: peak RSS growth above the RSS right
after the model and optimizer are built, each objective in its own fresh subprocess (so one run's
allocator high-water mark cannot hide the other's).

    .venv/bin/python benchmarks/step_cost.py            # writes docs/benchmarks.md section + JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "step_cost.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## TwinFlow step vs flow-matching step"


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def run_one(method: str, teacher: str, batch: int, steps: int, warmup: int) -> dict:
    import torch

    from twinflow.method import Teacher, build_objective
    from twinflow.method.config import FlowMatchingConfig, TwinFlowConfig
    from twinflow.models import build_generator
    from twinflow.models.config import ModelConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g", text_max_length=16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    cfg = TwinFlowConfig(teacher=teacher) if method == "twinflow" else FlowMatchingConfig(cond_dropout=0.1)
    objective = build_objective(cfg)
    teacher_obj = Teacher(model, teacher, decay=0.99) if method == "twinflow" else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen).clamp(-1, 1)
    cond = {
        "text_states": torch.randn(batch, 16, 384, generator=gen),
        "text_mask": torch.ones(batch, 16, dtype=torch.long),
    }
    null = {"text_states": torch.zeros(1, 16, 384), "text_mask": torch.zeros(1, 16, dtype=torch.long)}
    null["text_mask"][:, 0] = 1
    rss0 = _rss_kb("VmRSS")
    times, calls = [], 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        if teacher_obj is not None:
            teacher_obj.update()
        out = objective(
            model, x, cond, teacher=teacher_obj, null_cond=null, generator=gen, update_teacher=False
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        calls = out.model_calls
    return {
        "method": method,
        "teacher": teacher if method == "twinflow" else None,
        "batch": batch,
        "step_s_median": statistics.median(times),
        "model_calls": calls,
        "peak_rss_growth_mb": (_rss_kb("VmHWM") - rss0) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "TEACHER"))
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child[0], args.child[1], args.batch, args.steps, args.warmup)))
        return 0
    runs = []
    for method, teacher in [("flow_matching", "-"), ("twinflow", "online"), ("twinflow", "ema")]:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                teacher,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fm = runs[0]
    for r in runs:
        r["time_ratio"] = r["step_s_median"] / fm["step_s_median"]
        r["memory_ratio"] = (
            r["peak_rss_growth_mb"] / fm["peak_rss_growth_mb"] if fm["peak_rss_growth_mb"] > 0 else None
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(runs, indent=2))
    lines = [
        SECTION,
        "",
        f"Command: `.venv/bin/python benchmarks/step_cost.py` (qwen_image tiny-28g, batch {args.batch}, "
        f"1 CPU thread, median of {args.steps} steps after {args.warmup} warm-up; this 2-core machine). "
        "Targets: time <= 2.5x, memory <= 1.15x.",
        "",
        "| objective | teacher | model calls/step | step time (s) | time ratio | peak RSS growth (MB) | memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "n/a"
        lines.append(
            f"| {r['method']} | {r['teacher'] or '-'} | {r['model_calls']} | {r['step_s_median']:.3f} | "
            f"{r['time_ratio']:.2f} | {r['peak_rss_growth_mb']:.1f} | {mem} |"
        )
    section = "\n".join(lines) + "\n"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if SECTION in text:
        head, _, rest = text.partition(SECTION)
        nxt = rest.find("\n## ")
        text = head + section + (rest[nxt + 1 :] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.write_text(text)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
