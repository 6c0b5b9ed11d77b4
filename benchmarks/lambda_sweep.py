"""The lambda sweep of issue 11: does TwinFlow hold at every lambda, and where is the optimum?

Each trial fine-tunes a flow-matching base export with TwinFlow (`jobs/<ds>_twinflow.yaml`) for
`--steps` optimizer steps in one process (`twinflow.train.inprocess`: the same model, objective, teacher
and data decoding as `twinflow train`, without Ray Train's per-trial start-up, which would cost more
than the trials themselves on 2 cores), then samples 1 and 2 NFE from its sampling EMA and scores them
with the dataset's judge (`twinflow.eval`): Frechet distance, adherence, diversity, saturation. The
training diagnostics (ADV loss, |dv|, cos(dv, -x_g), one-step saturation) are kept per logged step, so a
run-away shows as a growing ADV loss and saturation.

    .venv/bin/python benchmarks/lambda_sweep.py                 # both datasets, 32 trials, ~40 min on 2 cores
    .venv/bin/python benchmarks/lambda_sweep.py --stage report  # redraw docs/tuning.md's section

Bases: `runs/<ds>_base_fm/export` (made by `twinflow train jobs/<ds>_base_fm.yaml`, or by the demo for
MNIST); `--base-<ds>` points elsewhere. Writes benchmarks/results/lambda_sweep.json and the section of
docs/tuning.md between the LAMBDA_SWEEP markers. Trials run `--parallel` at a time, one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "lambda_sweep.json"
DOC = ROOT / "docs" / "tuning.md"
BEGIN, END = "<!-- LAMBDA_SWEEP:BEGIN -->", "<!-- LAMBDA_SWEEP:END -->"
DATASETS = {
    "mnist": ("jobs/mnist_twinflow.yaml", "runs/mnist_base_fm/export"),
    "fashion_mnist": ("jobs/fashion_twinflow.yaml", "runs/fashion_base_fm/export"),
}
LAMBDAS = (0.0, 0.15, 1 / 3, 0.5, 0.75)
KAPPAS = (0.25, 1.0)  # the small kappa axis, at lambda = 1/3
# and the optional fake-branch start (model.fake_branch: mirror) against the default, at lambda = 1/3
DIVERGED_SATURATION = 5.0  # late one-step saturation above 5x the real images': white blobs, a run-away
DIVERGED_ADV_GROWTH = 1.5  # final ADV loss above 1.5x the first logged one: the fake samples are growing


def judge_divergence(hist: list[dict[str, float]], late_sat: float, real_sat: float) -> bool:
    """A run-away as the pre-fix runs showed it (ADV loss 70-400 from ~1, saturated blobs); the baked-in
    CFG alone raises saturation above real (the base at CFG 3 reaches about 3x on Fashion-MNIST)."""
    import math

    adv = [h["loss_adv"] for h in hist if "loss_adv" in h]
    return (
        not all(math.isfinite(v) for h in hist for v in h.values())
        or late_sat > DIVERGED_SATURATION * real_sat
        or (len(adv) >= 2 and adv[-1] > DIVERGED_ADV_GROWTH * adv[0])
    )


def trials(datasets: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    out = []
    for ds in datasets:
        for seed in seeds:
            for lam in LAMBDAS:
                out.append(
                    {"dataset": ds, "lambda": lam, "kappa": 0.5, "seed": seed, "fake_branch": "signed"}
                )
            for kappa in KAPPAS:
                out.append(
                    {"dataset": ds, "lambda": 1 / 3, "kappa": kappa, "seed": seed, "fake_branch": "signed"}
                )
            out.append({"dataset": ds, "lambda": 1 / 3, "kappa": 0.5, "seed": seed, "fake_branch": "mirror"})
    return out


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One fine-tune + its judged samples (runs in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from twinflow.eval.judges import load_judge
    from twinflow.eval.metrics import evaluate_generator, real_reference, real_saturation
    from twinflow.models.text_encoder import TextEncoder
    from twinflow.train.config import load_job
    from twinflow.train.inprocess import load_memory_data, train_in_process

    job_yaml = DATASETS[spec["dataset"]][0]
    job = load_job(
        ROOT / job_yaml,
        [
            f"train.init_from={spec['base']}",
            f"method.lambda={spec['lambda']}",
            f"method.kappa={spec['kappa']}",
            f"train.seed={spec['seed']}",
            f"train.steps={spec['steps']}",
            f"model.fake_branch={spec['fake_branch']}",
            *spec["overrides"],
        ],
    )
    job.data.path = str(ROOT / job.data.path)
    enc = TextEncoder(max_length=job.data.text_max_length)
    t0 = time.perf_counter()
    data = load_memory_data(job.data, enc)
    run = train_in_process(job, data=data, encoder=enc, log_every=25)
    train_s = time.perf_counter() - t0
    judge = load_judge(spec["dataset"])
    m = evaluate_generator(
        run.sampling_model,
        list(range(10)),
        [1, 2],
        judge,
        reference=real_reference(judge),
        text_encoder=enc,
        images_per_prompt=spec["per_class"],
        sampler="few",
        seed=11,
    )
    keys = ("loss_adv", "dv_abs", "dv_cos", "sat_onestep", "total")
    hist = [{"step": int(h["step"]), **{k: h[k] for k in keys if k in h}} for h in run.history]
    real_sat = real_saturation(spec["dataset"])
    late_sat = max((h.get("sat_onestep", 0.0) for h in hist if h["step"] > spec["steps"] // 2), default=0.0)
    diverged = judge_divergence(hist, late_sat, real_sat)
    return {
        **{k: v for k, v in spec.items() if k not in ("overrides",)},
        "metrics": m,
        "history": hist,
        "diverged": bool(diverged),
        "late_max_saturation": late_sat,
        "real_saturation": real_sat,
        "train_s": round(train_s, 1),
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds per (dataset, lambda, kappa)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        r["diverged"] = judge_divergence(r["history"], r["late_max_saturation"], r["real_saturation"])
        groups.setdefault((r["dataset"], round(r["lambda"], 4), r["kappa"], r["fake_branch"]), []).append(r)
    rows = []
    for (ds, lam, kappa, branch), rs in sorted(groups.items()):

        def mean(k, rs=rs):
            return sum(r["metrics"][k] for r in rs) / len(rs)

        rows.append(
            {
                "dataset": ds,
                "lambda": lam,
                "kappa": kappa,
                "fake_branch": branch,
                "seeds": len(rs),
                "diverged": sum(r["diverged"] for r in rs),
                **{
                    k: mean(f"eval/{k}")
                    for k in (
                        "fd_nfe1",
                        "adherence_nfe1",
                        "diversity_nfe1",
                        "saturation_nfe1",
                        "fd_nfe2",
                        "adherence_nfe2",
                    )
                },
                "fd_floor": rs[0]["metrics"]["eval/fd_floor"],
                "real_saturation": rs[0]["real_saturation"],
                "final_loss_adv": sum(r["history"][-1].get("loss_adv", float("nan")) for r in rs) / len(rs),
                "final_dv_cos": sum(r["history"][-1].get("dv_cos", float("nan")) for r in rs) / len(rs),
            }
        )
    return {"rows": rows}


def _num(v: float, fmt: str) -> str:
    """'-' where the metric does not exist (lambda = 0 has no ADV or E2E rows)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def write_doc(results: dict[str, Any]) -> None:
    cfg = results["config"]
    lines = [
        BEGIN,
        "",
        f"Measured {results['date']} with "
        + " and ".join(f"`{c}`" for c in cfg["commands"])
        + f" ({cfg['steps']} steps per trial, "
        f"micro-batch {cfg['micro_batch']}, lr {cfg['lr']}, online teacher, w {cfg['enhanced_ratio']}, "
        f"seeds {cfg['seeds']}, {cfg['per_class']} samples per class from each trial's sampling EMA; "
        f"{results['wall_s'] / 60:.0f} min wall). Means over seeds; `diverged` counts seeds whose ADV "
        "loss ended above 1.5x its first logged value, whose late one-step saturation passed 5x the real images', or "
        "that went non-finite.",
        "",
    ]
    for ds in cfg["datasets"]:
        rows = [r for r in results["summary"]["rows"] if r["dataset"] == ds]
        lines += [
            f"**{ds}** (real floor: FD {rows[0]['fd_floor']:.2f}, saturation {rows[0]['real_saturation']:.3f})",
            "",
            "| lambda | kappa | fake branch | diverged | FD 1 NFE | adherence 1 NFE | diversity 1 NFE "
            "| saturation 1 NFE | FD 2 NFE | final ADV loss | final cos(dv, -x_g) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['lambda']:.2f} | {r['kappa']:g} | {r['fake_branch']} | {r['diverged']}/{r['seeds']} "
                f"| {r['fd_nfe1']:.2f} "
                f"| {r['adherence_nfe1']:.1%} | {r['diversity_nfe1']:.2f} | {r['saturation_nfe1']:.3f} "
                f"| {r['fd_nfe2']:.2f} | {_num(r['final_loss_adv'], '.3f')} | {_num(r['final_dv_cos'], '+.2f')} |"
            )
        lines.append("")
    lines.append(END)
    text = DOC.read_text()
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist,fashion_mnist")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--base-mnist", default=None)
    p.add_argument("--base-fashion_mnist", default=None)
    p.add_argument("--stage", choices=["all", "report"], default="all")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.stage == "report":  # recompute the summary (and divergence calls) from the stored trials
        data = json.loads(Path(args.out).read_text())
        data["summary"] = summarize(data["trials"])
        Path(args.out).write_text(json.dumps(data, indent=2, default=float))
        write_doc(data)
        return 0
    datasets = [d for d in args.datasets.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    bases = {ds: str(Path(getattr(args, f"base_{ds}") or DATASETS[ds][1]).resolve()) for ds in datasets}
    for ds, b in bases.items():
        if not (Path(b) / "twinflow.json").is_file():
            p.error(
                f"no base export for {ds} at {b}: run `twinflow train jobs/{ds.split('_')[0]}_base_fm.yaml` "
                f"first (or pass --base-{ds})"
            )
    overrides = []  # the shipped TwinFlow job as it is (online teacher, lr 1e-4, micro-batch 32, sampling EMA)
    specs = [
        {
            **t,
            "base": bases[t["dataset"]],
            "steps": args.steps,
            "per_class": args.per_class,
            "overrides": overrides,
        }
        for t in trials(datasets, seeds)
    ]
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        for r in pool.map(run_trial, specs):
            results.append(r)
            print(
                f"[sweep] {r['dataset']} lambda={r['lambda']:.2f} kappa={r['kappa']} seed={r['seed']}: "
                f"fd1={r['metrics']['eval/fd_nfe1']:.2f} adh1={r['metrics']['eval/adherence_nfe1']:.1%} "
                f"div1={r['metrics']['eval/diversity_nfe1']:.2f} diverged={r['diverged']} ({r['train_s']} s)",
                flush=True,
            )
    from twinflow.train.config import load_job

    probe = load_job(ROOT / DATASETS[datasets[0]][0], overrides)
    wall = time.perf_counter() - t0
    commands = ["python benchmarks/lambda_sweep.py " + " ".join(argv or sys.argv[1:])]
    if Path(args.out).is_file():  # keep the other datasets' trials (one invocation per dataset is fine)
        old = json.loads(Path(args.out).read_text())
        kept = [t for t in old["trials"] if t["dataset"] not in datasets]
        if kept:
            results = kept + results
            wall += old["wall_s"]
            bases = {**old["config"]["bases"], **bases}
            commands = [c for c in old["config"]["commands"] if c not in commands] + commands
    all_ds = [d for d in DATASETS if any(t["dataset"] == d for t in results)]
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "wall_s": wall,
        "config": {
            "datasets": all_ds,
            "seeds": seeds,
            "steps": args.steps,
            "per_class": args.per_class,
            "lr": probe.train.lr,
            "micro_batch": probe.train.micro_batch,
            "enhanced_ratio": probe.method.enhanced_ratio,
            "bases": bases,
            "commands": commands,
        },
        "trials": results,
        "summary": summarize(results),
    }
    from _paths import repo_relative  # sibling module benchmarks/_paths.py

    out = repo_relative(out, ROOT)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float))
    write_doc(out)
    print(f"[sweep] wrote {args.out} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
