"""Where the 1-NFE gap comes from: TwinFlow's one-step FD and diversity, in both feature spaces,
against one factor at a time. Implemented factor: fine-tune length.

One base (the shipped base job, `train.steps` shortened, trained in process like
`quality.py --in-process`), scored at 50 NFE on its ODE with its CFG (the reference of the ratio);
then one TwinFlow fine-tune of it (the shipped job, in process) scored at 1 NFE after each step count
in `--at` (step 0 is the base itself under TwinFlow's one-step sampler). Same prompts, noise and
sample count everywhere.

    .venv/bin/python benchmarks/gap_curves.py --dataset mnist --base-steps 800 --at 0,30,60,120,240,480

Writes benchmarks/results/gap_curves_<dataset>.json and docs/img/gap_finetune_length_<dataset>.png.
Scoring between steps uses its own seeded noise; at step 120 it reproduced an unscored run of that
length exactly (`quality.py --in-process --twinflow-steps 120`, same base and seed).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("fd", "diversity", "adherence", "fd_ae", "diversity_ae")


def run(dataset: str, base_steps: int, at: list[int], samples_per_class: int, seed: int) -> dict[str, Any]:
    import torch
    from quality import in_process_jobs  # sibling module benchmarks/quality.py

    from twinflow.eval.judges import load_judge
    from twinflow.eval.metrics import evaluate_generator, real_reference
    from twinflow.train.inprocess import train_in_process

    torch.set_num_threads(1)
    base_job, twin_job, enc, data = in_process_jobs(dataset, base_steps, max(at))
    judge = load_judge(dataset)
    ref = real_reference(judge)

    def score(model, nfe: int, sampler: str, guidance: float = 0.0) -> dict[str, float]:
        details: dict[str, Any] = {}
        evaluate_generator(
            model,
            list(range(judge.dataset.num_classes)),
            [nfe],
            judge,
            reference=ref,
            text_encoder=enc,
            images_per_prompt=samples_per_class,
            sampler=sampler,
            seed=seed,
            guidance=guidance,
            details=details,
        )
        m = details["per_setting"][f"nfe{nfe}"]
        return {k: float(m[k]) for k in KEYS} | {"floor_" + k: float(v) for k, v in details["floor"].items()}

    t0 = time.perf_counter()
    base = train_in_process(base_job, data=data, encoder=enc, log_every=100).sampling_model
    t_base = time.perf_counter() - t0
    base50 = score(base, 50, "ode", base_job.method.sample_guidance)
    points = {0: score(base, 1, "few")} if 0 in at else {}

    def on_step(step: int, run_: Any) -> None:
        if step in at:
            points[step] = score(run_.sampling_model, 1, "few")
            print(f"[gap] {dataset} fine-tune step {step}: {points[step]}", flush=True)

    t1 = time.perf_counter()
    train_in_process(
        twin_job, data=data, encoder=enc, model=copy.deepcopy(base).train(), log_every=50, on_step=on_step
    )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "dataset": dataset,
        "factor": "fine-tune length (steps)",
        "base_steps": base_steps,
        "samples_per_class": samples_per_class,
        "seed": seed,
        "base_50nfe": base50,
        "twinflow_1nfe": {str(k): points[k] for k in sorted(points)},
        "base_train_s": round(t_base, 1),
        "finetune_and_eval_s": round(time.perf_counter() - t1, 1),
        "machine": "2-core CPU shared with other jobs, one thread, no GPU",
    }


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in res["twinflow_1nfe"]]
    pts = [res["twinflow_1nfe"][str(s)] for s in steps]
    b = res["base_50nfe"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label, style in (("fd", "judge", "o-"), ("fd_ae", "AE space", "s-")):
        axes[0].plot(steps, [p[key] / b[key] for p in pts], style, label=label)
    for key, label, style in (("diversity", "judge", "o-"), ("diversity_ae", "AE space", "s-")):
        axes[1].plot(steps, [p[key] for p in pts], style, label=label)
    axes[0].axhline(1.1, color="gray", ls="--", label="target 1.1")
    axes[1].axhline(0.85, color="gray", ls="--", label="target 0.85")
    axes[0].set_title("TwinFlow 1-NFE FD / base 50-NFE FD", fontsize=10)
    axes[1].set_title("TwinFlow 1-NFE diversity (real = 1)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("fine-tune steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    fig.suptitle(f"{res['dataset']}: one-step gap against fine-tune length (base {res['base_steps']} steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(res: dict[str, Any]) -> str:
    b = res["base_50nfe"]
    lines = [
        "| fine-tune steps | FD ratio, judge | FD ratio, AE space | diversity, judge | diversity, AE space "
        "| adherence |",
        "|---|---|---|---|---|---|",
    ]
    for s, p in res["twinflow_1nfe"].items():
        lines.append(
            f"| {s} | {p['fd'] / b['fd']:.2f} | {p['fd_ae'] / b['fd_ae']:.2f} | {p['diversity']:.2f} | "
            f"{p['diversity_ae']:.2f} | {p['adherence']:.1%} |"
        )
    lines.append(
        f"| *base, 50 NFE (the reference)* | 1 (FD {b['fd']:.2f}) | 1 (FD {b['fd_ae']:.1f}) | "
        f"{b['diversity']:.2f} | {b['diversity_ae']:.2f} | {b['adherence']:.1%} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.add_argument("--base-steps", type=int, default=800)
    p.add_argument("--at", default="0,30,60,120,240,480", help="fine-tune steps to score at")
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    at = sorted({int(s) for s in args.at.split(",")})
    if not at or at[0] < 0 or max(at) < 1:
        p.error(f"--at {args.at!r}: give non-negative step counts, at least one above 0")
    res = run(args.dataset, args.base_steps, at, args.samples_per_class, args.seed)
    out = ROOT / "benchmarks" / "results" / f"gap_curves_{args.dataset}.json"
    out.write_text(json.dumps(res, indent=2))
    png = plot(res, ROOT / "docs" / "img" / f"gap_finetune_length_{args.dataset}.png")
    print(markdown(res))
    print(f"[gap] wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
