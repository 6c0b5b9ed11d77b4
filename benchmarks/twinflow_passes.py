"""TwinFlow step time over a flow-matching step at equal batch (online teacher), measured in ONE process
with the objectives interleaved step by step (FM, TF, [TF at a baseline commit], FM, TF, ...), so that
a loaded, noisy machine slows them alike; medians of the per-step times. Each step is timed twice: wall
clock, and the process's CPU time (torch runs on one thread, so CPU time is the step's compute and
does not count the time other processes held the cores: the steadier figure on a shared machine).

    .venv/bin/python benchmarks/twinflow_passes.py --preset tiny-28g --batch 32 --reps 30
    .venv/bin/python benchmarks/twinflow_passes.py --preset small-28g --batch 16 --reps 12 --baseline fb578a2~1 --baseline fb578a2 --no-skip

--baseline REV also times the TwinFlow objective as it was at git revision REV (its twinflow.py loaded
from git into a scratch module; the rest of the package is today's), to show a change's effect in the
same run. Prints one JSON object: per objective the median wall and CPU step time, their ratios to flow
matching, model calls and no-grad rows per step, and what one no-grad row costs against one trained row
(CPU time; the no-grad calls' fixed costs spread over their rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def baseline_objective(rev: str):
    """TwinFlowObjective class from platform/twinflow/method/twinflow.py at git revision `rev`."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:platform/twinflow/method/twinflow.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="twinflow-baseline-")) / "twinflow_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("twinflow_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TwinFlowObjective


def _no_rollout_skip():
    import twinflow.method.twinflow as tw

    class NoRolloutSkip(tw.TwinFlowObjective):
        """Today's objective with every base row rolled out (as before the t - r < delta skip)."""

        def __call__(self, *args, **kwargs):
            keep = tw.rollout_rows
            tw.rollout_rows = lambda t, r, delta: slice(None)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                tw.rollout_rows = keep

    return NoRolloutSkip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-28g")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--baseline", action="append", default=[], help="git revision whose TwinFlow objective is timed too"
    )
    ap.add_argument(
        "--no-skip", action="store_true", help="also time today's objective rolling out every row"
    )
    args = ap.parse_args(argv)

    from twinflow.method import build_objective
    from twinflow.method.config import FlowMatchingConfig, TwinFlowConfig
    from twinflow.models import build_generator
    from twinflow.models.config import ModelConfig

    NoRolloutSkip = _no_rollout_skip()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_generator(ModelConfig(family="qwen_image", preset=args.preset, text_max_length=16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tf_cfg = TwinFlowConfig(teacher="online")
    objectives = {
        "flow_matching": build_objective(FlowMatchingConfig(cond_dropout=0.1)),
        "twinflow": build_objective(tf_cfg),
    }
    for rev in args.baseline:
        objectives[f"twinflow@{rev}"] = baseline_objective(rev)(tf_cfg)
    if args.no_skip:
        objectives["twinflow_no_rollout_skip"] = NoRolloutSkip(tf_cfg)
    gen = torch.Generator().manual_seed(0)
    B = args.batch
    channels = 3 if "rgb" in args.preset else 1
    size = int(args.preset.split("-")[1].rstrip("grb"))
    x = torch.randn(B, channels, size, size, generator=gen).clamp(-1, 1)
    cond = {
        "text_states": torch.randn(B, 16, 384, generator=gen),
        "text_mask": torch.ones(B, 16, dtype=torch.long),
    }
    null = {"text_states": torch.zeros(1, 16, 384), "text_mask": torch.zeros(1, 16, dtype=torch.long)}
    null["text_mask"][:, 0] = 1

    times: dict[str, list[float]] = {k: [] for k in objectives}
    cpu: dict[str, list[float]] = {k: [] for k in objectives}
    info: dict[str, dict] = {k: {} for k in objectives}
    for i in range(args.warmup + args.reps):
        for name, obj in objectives.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = obj(model, x, cond, teacher=None, null_cond=null, generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
                info[name].setdefault("nograd_rows", []).append(out.nograd_rows)
                info[name]["model_calls"] = out.model_calls
    fm = statistics.median(times["flow_matching"])
    fm_cpu = statistics.median(cpu["flow_matching"])
    result = {"preset": args.preset, "batch": B, "reps": args.reps, "threads": args.threads, "objectives": {}}
    for name in objectives:
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        result["objectives"][name] = {
            "step_s_median": round(med, 4),
            "ratio_to_flow_matching": round(med / fm, 3),
            "cpu_s_median": round(med_cpu, 4),
            "cpu_ratio_to_flow_matching": round(med_cpu / fm_cpu, 3),
            "model_calls": info[name]["model_calls"],
            "nograd_rows_mean": round(statistics.mean(info[name]["nograd_rows"]), 1),
        }
        rows = statistics.mean(info[name]["nograd_rows"])
        if rows:  # CPU cost of one extra no-grad row (its call's fixed cost included) per trained row
            extra_per_row = (med_cpu - fm_cpu) / rows
            result["objectives"][name]["nograd_row_vs_trained_row_cpu"] = round(
                extra_per_row / (fm_cpu / B), 3
            )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
