"""Quality benchmark (issue 11): one-step TwinFlow vs the multi-step flow-matching base it fine-tunes.

Per dataset (MNIST, Fashion-MNIST), on this machine's CPUs, with the shipped job YAMLs as they are:

1. **base**: `twinflow train jobs/<ds>_base_fm.yaml` (flow matching from scratch; its export holds the
   sampling EMA and recommends its CFG, `method.sample_guidance`).
2. **twinflow**: `twinflow train jobs/<ds>_twinflow.yaml` from that export.
3. **eval**: `twinflow.eval.run_eval` (the same Ray Data job as `twinflow eval`): the base on its ODE at
   1, 2, 4, 50 NFE with its CFG, TwinFlow at 1, 2, 4 NFE at guidance 0; the same noise for every arm;
   Frechet distance in the judge's feature space against the held-out split (with the real-vs-real
   floor), prompt adherence, diversity relative to real data, share of saturated pixels; FD and
   diversity again in a second feature space independent of the judge (`fd_ae`, `diversity_ae`: the
   bottleneck of a convolutional autoencoder trained without labels, `twinflow.eval.autoencoder_space`).
4. **guidance**: the CFG scale the fine-tune baked in, measured against the base on held-out images
   (`twinflow.eval.guidance.effective_guidance`).

Writes benchmarks/results/quality.json, the plots and grids under docs/img/, and the section of
docs/evaluation.md between the QUALITY markers. The exact command that produced the shipped results:

    .venv/bin/python benchmarks/quality.py

A training run is reused when its run directory already holds a finished export trained from the same
job config (`make demo` leaves exactly such MNIST runs; `--retrain` forces new runs); `--stage train|eval`
runs one half, `--stage report` only redraws the doc section, plots and grids from the results JSON.
`--datasets mnist` measures one dataset and keeps the other datasets' earlier figures in the results
JSON (each dataset records its own date).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quality.json"
DOC = ROOT / "docs" / "evaluation.md"
IMG = ROOT / "docs" / "img"
BEGIN, END = "<!-- QUALITY:BEGIN -->", "<!-- QUALITY:END -->"

DATASETS = {  # the shipped job YAMLs, run as they are
    "mnist": {
        "base": "jobs/mnist_base_fm.yaml",
        "twinflow": "jobs/mnist_twinflow.yaml",
        "data": "data/mnist_digits",
    },
    "fashion_mnist": {
        "base": "jobs/fashion_base_fm.yaml",
        "twinflow": "jobs/fashion_twinflow.yaml",
        "data": "data/fashion_mnist",
    },
}
ARMS = {  # arm -> (job key, NFE list, label)
    "base": ("base", [1, 2, 4, 50], "flow-matching base"),
    "twinflow": ("twinflow", [1, 2, 4], "TwinFlow fine-tune"),
}
TARGETS = {
    "fd_ratio_max": 1.1,
    "mnist_adherence_min": 0.95,
    "diversity_min": 0.9,
    "saturation_ratio_max": 2.0,
    "base_adherence_min": {"mnist": 0.95, "fashion_mnist": 0.80},
}


# ---------------------------------------------------------------------------------------------- training


def _reusable(run_dir: Path, job_dict: dict[str, Any]) -> bool:
    """A finished run of exactly this job config (job.json as the launcher wrote it) with an export."""
    summary, job_json = run_dir / "summary.json", run_dir / "job.json"
    if not (summary.is_file() and job_json.is_file() and (run_dir / "export" / "twinflow.json").is_file()):
        return False
    if not json.loads(summary.read_text()).get("ok"):
        return False
    return json.loads(job_json.read_text()) == job_dict


def run_training(path: str, overrides: list[str], retrain: bool) -> dict[str, Any]:
    from twinflow.train.config import load_job
    from twinflow.train.launcher import run_dir_of, run_job

    job = load_job(ROOT / path, overrides)
    run_dir = run_dir_of(job)
    probe = job.model_copy(deep=True)
    if probe.train.init_from and "://" not in probe.train.init_from:
        probe.train.init_from = str(Path(probe.train.init_from).expanduser().resolve())
    if "://" not in probe.data.path:  # the launcher records the data path resolved for the workers
        probe.data.path = str(Path(probe.data.path).expanduser().resolve())
    wanted = json.loads(probe.model_dump_json(by_alias=True))
    if not retrain and _reusable(run_dir, wanted):
        info = (
            json.loads((run_dir / "bench_time.json").read_text())
            if (run_dir / "bench_time.json").is_file()
            else {}
        )
        print(f"[quality] reusing {run_dir} (same job config, finished)", flush=True)
        return {"run_dir": str(run_dir), "export": str(run_dir / "export"), "reused": True, **info}
    t0 = time.perf_counter()
    result = run_job(job, fresh=True)
    wall = time.perf_counter() - t0
    if not result.ok:
        raise RuntimeError(f"training {path} {overrides} failed ({result.state}): {result.error}")
    metrics = [
        json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines() if line
    ]
    step_s = metrics[-1].get("step_s") if metrics else None
    info = {
        "wall_s": round(wall, 1),
        "steps": result.steps,
        "step_s": step_s,
        "command": f"twinflow train {path} " + " ".join(f"--set {o}" for o in overrides),
    }
    (run_dir / "bench_time.json").write_text(json.dumps(info, indent=2))
    return {"run_dir": str(run_dir), "export": str(run_dir / "export"), "reused": False, **info}


def train_dataset(ds: str, retrain: bool) -> dict:
    """The base job, then the TwinFlow job from its export (run names and outputs as in the YAMLs)."""
    jobs = DATASETS[ds]
    base = run_training(jobs["base"], [], retrain)
    twin = run_training(jobs["twinflow"], [f"train.init_from={base['export']}"], retrain)
    return {"base": base, "twinflow": twin}


# ---------------------------------------------------------------------------------------------- eval


def evaluate_all(datasets: list[str], trained: dict, samples_per_class: int, actors: int, seed: int) -> dict:
    """Two `run_eval` jobs (the same Ray Data job as `twinflow eval`): every arm at 1, 2, 4 NFE, then the
    flow-matching arms at 50 NFE. The dataset of each checkpoint is inferred from its run's job.json."""
    from twinflow.eval.job import EvalRequest, run_eval

    out: dict[str, Any] = {ds: {"arms": {}} for ds in datasets}
    jobs = [
        ([(ds, arm) for ds in datasets for arm in ARMS], [1, 2, 4], "nfe_1_2_4"),
        ([(ds, arm) for ds in datasets for arm, spec in ARMS.items() if 50 in spec[1]], [50], "nfe_50"),
    ]
    for members, nfe, tag in jobs:
        req = EvalRequest(
            checkpoints=[trained[ds][arm]["export"] for ds, arm in members],
            nfe=nfe,
            samples_per_class=samples_per_class,
            actors=actors,
            seed=seed,
            grid_per_class=6,
            out_dir=str(ROOT / "runs" / "quality_eval" / tag),
        )
        report = run_eval(req)
        for (ds, arm), ck in zip(members, report["checkpoints"]):
            a = out[ds]["arms"].setdefault(
                arm,
                {
                    "label": ARMS[arm][2],
                    "sampler": ck["sampler"],
                    "guidance": ck.get("guidance", 0.0),
                    "nfe": {},
                    "samples": {},
                    "floor": ck["floor"],
                    "checkpoint": ck["checkpoint"],
                    "grids": [],
                },
            )
            a["nfe"].update(ck["nfe"])
            a["samples"].update(ck["samples"])
            a["grids"].append(ck.get("grid"))
            out[ds]["judge_accuracy"] = report["datasets"][ds]["judge"]["heldout"].get("accuracy")
            out[ds]["judge"] = report["datasets"][ds]["judge"]
            if "feature_space" in report["datasets"][ds]:
                out[ds]["feature_space"] = report["datasets"][ds]["feature_space"]
        out.setdefault("_eval_wall_s", {})[tag] = report["wall_s"]
    for ds in datasets:  # NFE in ascending order
        for a in out[ds]["arms"].values():
            a["nfe"] = {k: a["nfe"][k] for k in sorted(a["nfe"], key=int)}
    return out


# ---------------------------------------------------------------------------------------------- report


def measure_guidance(ds: str, trained: dict, rows: int = 200) -> dict[str, float]:
    """The CFG scale the TwinFlow fine-tune baked in, relative to its base, on held-out images."""
    import torch

    from twinflow.data import iter_local_batches
    from twinflow.eval.guidance import effective_guidance
    from twinflow.models.export_loader import load_generator
    from twinflow.models.text_encoder import TextEncoder

    base, _ = load_generator(trained["base"]["export"])
    twin, meta = load_generator(trained["twinflow"]["export"])
    enc = TextEncoder(max_length=int(meta["text_encoder"]["max_length"]))
    batch = next(iter_local_batches(str(ROOT / DATASETS[ds]["data"]), "eval", batch_size=rows, limit=rows))
    cond = enc.encode([str(c) for c in batch["caption"]])
    with torch.no_grad():
        return effective_guidance(twin, base, torch.as_tensor(batch["image"]), cond, enc.null_condition())


def check_targets(ds: str, res: dict) -> dict[str, Any]:
    base50 = res["base"]["nfe"]["50"]
    tf1 = res["twinflow"]["nfe"]["1"]
    real_sat = res["base"]["floor"].get("saturation")
    out = {
        "base_adherence_50nfe": base50["adherence"],
        "base_adherence_ok": base50["adherence"] >= TARGETS["base_adherence_min"][ds],
        "fd_ratio_1nfe_vs_base50": tf1["fd"] / base50["fd"],
        "fd_ok": tf1["fd"] <= TARGETS["fd_ratio_max"] * base50["fd"],
        "diversity_1nfe": tf1["diversity"],
        "diversity_ok": tf1["diversity"] >= TARGETS["diversity_min"],
    }
    if "fd_ae" in tf1 and "fd_ae" in base50:  # the second feature space, against the same targets
        out.update(
            fd_ae_ratio_1nfe_vs_base50=tf1["fd_ae"] / base50["fd_ae"],
            fd_ae_ok=tf1["fd_ae"] <= TARGETS["fd_ratio_max"] * base50["fd_ae"],
            diversity_ae_1nfe=tf1["diversity_ae"],
            diversity_ae_ok=tf1["diversity_ae"] >= TARGETS["diversity_min"],
        )
    if real_sat:
        ratio = tf1["saturation"] / real_sat
        out.update(
            saturation_ratio_1nfe=ratio,
            saturation_ok=1 / TARGETS["saturation_ratio_max"] <= ratio <= TARGETS["saturation_ratio_max"],
        )
    if ds == "mnist":
        out["adherence_1nfe"] = tf1["adherence"]
        out["adherence_ok"] = tf1["adherence"] >= TARGETS["mnist_adherence_min"]
    return out


# ------------------------------------------------------------------------------------ in-process rehearsal

QUICK_RESULTS = ROOT / "benchmarks" / "results" / "quality_quick.json"
QUICK_BEGIN, QUICK_END = "<!-- QUALITY_QUICK:BEGIN -->", "<!-- QUALITY_QUICK:END -->"


def shipped_job(ds: str, kind: str, overrides: Sequence[str] = ()):
    """The dataset's shipped `kind` job ("base" or "twinflow") with `overrides`, its data path made
    absolute; a fine-tune takes its base from the caller, not `init_from`."""
    from twinflow.train.config import load_job

    first = ["train.init_from=null"] if kind == "twinflow" else []
    job = load_job(ROOT / DATASETS[ds][kind], [*first, *overrides])
    job.data.path = str(ROOT / job.data.path)
    return job


def in_process_jobs(ds: str, base_steps: int, twinflow_steps: int, overrides: Sequence[str] = ()):
    """The dataset's shipped base and TwinFlow jobs with their step counts and `overrides` changed,
    their data read into memory once with the caption encoder: (base job, TwinFlow job, encoder, data)
    for `train.inprocess`."""
    from twinflow.models.text_encoder import TextEncoder
    from twinflow.train.inprocess import load_memory_data

    base_job = shipped_job(ds, "base", [*overrides, f"train.steps={base_steps}"])
    twin_job = shipped_job(ds, "twinflow", [*overrides, f"train.steps={twinflow_steps}"])
    enc = TextEncoder(max_length=base_job.data.text_max_length)
    return base_job, twin_job, enc, load_memory_data(base_job.data, enc)


def quick_dataset(ds: str, base_steps: int, twinflow_steps: int, samples_per_class: int, seed: int) -> dict:
    """The cheapest path: both shipped jobs trained in this process (`train.inprocess`, one thread, one
    micro-batch of 32 per step instead of two Ray Train workers), only `train.steps` overridden, the
    fine-tune starting from the base's sampling EMA; scored by `evaluate_generator` (the numbers
    `twinflow eval` gives) in both feature spaces. Not the benchmark's models: far shorter runs."""
    import copy

    import torch

    from twinflow.eval.judges import load_judge
    from twinflow.eval.metrics import evaluate_generator, real_reference
    from twinflow.train.inprocess import train_in_process

    torch.set_num_threads(1)
    base_job, twin_job, enc, data = in_process_jobs(ds, base_steps, twinflow_steps)
    t0 = time.perf_counter()
    base = train_in_process(base_job, data=data, encoder=enc, log_every=100).sampling_model
    t_base = time.perf_counter() - t0
    twin = train_in_process(
        twin_job, data=data, encoder=enc, model=copy.deepcopy(base).train(), log_every=50
    ).sampling_model
    t_twin = time.perf_counter() - t0 - t_base
    judge = load_judge(ds)
    ref = real_reference(judge)
    arms: dict[str, Any] = {}
    for arm, model, sampler, guidance in (
        ("base", base, "ode", base_job.method.sample_guidance),
        ("twinflow", twin, "few", 0.0),
    ):
        details: dict[str, Any] = {}
        evaluate_generator(
            model,
            list(range(judge.dataset.num_classes)),
            ARMS[arm][1],
            judge,
            reference=ref,
            text_encoder=enc,
            images_per_prompt=samples_per_class,
            sampler=sampler,
            seed=seed,
            guidance=guidance,
            details=details,
        )
        arms[arm] = {
            "label": ARMS[arm][2],
            "sampler": sampler,
            "guidance": guidance,
            "nfe": {k[3:]: _scalars(v) for k, v in details["per_setting"].items()},
            "floor": details["floor"],
        }
    return {
        "arms": arms,
        "samples_per_class": samples_per_class,
        "judge_accuracy": judge.meta.get("heldout", {}).get("accuracy"),
        "feature_space": {
            k: v for k, v in ref.second[0].meta.items() if k in ("sha256", "heldout", "command")
        }
        if ref.second
        else None,
        "training": {
            "base": {"steps": base_steps, "wall_s": round(t_base, 1)},
            "twinflow": {"steps": twinflow_steps, "wall_s": round(t_twin, 1)},
        },
        "targets": check_targets(ds, arms),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _scalars(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if not isinstance(v, dict)}


def write_quick_report(results: dict[str, Any]) -> None:
    from quality_report import NAMES, table, targets_text

    cfg = results["config"]
    parts = [
        QUICK_BEGIN,
        "",
        f"Measured by `.venv/bin/python benchmarks/quality.py --in-process --base-steps "
        f"{cfg['base_steps']} --twinflow-steps {cfg['twinflow_steps']} --samples-per-class "
        f"{cfg['samples_per_class']} --datasets <dataset>` ({cfg['machine']}); raw "
        f"numbers in `benchmarks/results/quality_quick.json`. Short runs of the shipped jobs (only "
        "`train.steps` changed, one micro-batch of 32 per step in one process): not the benchmark's models, "
        "a check that the two feature spaces agree on generated images.",
        "",
    ]
    for ds, res in results["datasets"].items():
        tr = res["training"]
        parts += [
            f"#### {NAMES.get(ds, ds)} (base {tr['base']['steps']} steps, {tr['base']['wall_s']:.0f} s; "
            f"TwinFlow {tr['twinflow']['steps']} steps, {tr['twinflow']['wall_s']:.0f} s; "
            f"{res.get('samples_per_class', cfg['samples_per_class'])} samples per class; measured "
            f"{res.get('date', results['date'])})",
            "",
            table(ds, res),
            "",
            targets_text(ds, res, results["targets"]),
            "",
        ]
    parts.append(QUICK_END)
    section = "\n".join(parts)
    text = DOC.read_text()
    if QUICK_BEGIN in text and QUICK_END in text:
        text = text[: text.index(QUICK_BEGIN)] + section + text[text.index(QUICK_END) + len(QUICK_END) :]
    else:
        text = text.replace(END, END + "\n\n" + section, 1)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist,fashion_mnist")
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stage",
        choices=["all", "train", "eval", "report"],
        default="all",
        help="report: only rewrite docs/evaluation.md, plots and grids from the results JSON",
    )
    p.add_argument("--retrain", action="store_true")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="the cheapest path: short in-process runs of both jobs (--base-steps, --twinflow-steps), "
        "written to benchmarks/results/quality_quick.json (and under 'in_process' in --out) and their own "
        "section of docs/evaluation.md",
    )
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--twinflow-steps", type=int, default=100)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.chdir(ROOT)  # job YAMLs name data/ and runs/ relative to the checkout
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    if args.in_process:
        t0 = time.perf_counter()
        quick = {
            "date": time.strftime("%Y-%m-%d"),
            "config": {
                "base_steps": args.base_steps,
                "twinflow_steps": args.twinflow_steps,
                "samples_per_class": args.samples_per_class,
                "seed": args.seed,
                "machine": "2-core CPU shared with other jobs, one thread, no GPU",
            },
            "targets": TARGETS,
            "datasets": {
                ds: quick_dataset(ds, args.base_steps, args.twinflow_steps, args.samples_per_class, args.seed)
                for ds in datasets
            },
        }
        quick["total_wall_s"] = round(time.perf_counter() - t0, 1)
        for ds in datasets:
            quick["datasets"][ds]["date"] = quick["date"]
        if QUICK_RESULTS.is_file():  # a run of fewer datasets keeps the others' earlier figures
            for ds, res in json.loads(QUICK_RESULTS.read_text()).get("datasets", {}).items():
                quick["datasets"].setdefault(ds, res)
        QUICK_RESULTS.write_text(json.dumps(quick, indent=2))
        main_results = Path(args.out)
        if main_results.is_file():  # carried beside the benchmark's figures, which it does not replace
            full = json.loads(main_results.read_text())
            full["in_process"] = quick
            main_results.write_text(json.dumps(full, indent=2))
        write_quick_report(quick)
        print(
            f"[quality] wrote {QUICK_RESULTS}, its copy under 'in_process' in {main_results} and its section of {DOC}"
        )
        return 0
    if args.stage == "report":
        from quality_report import write_report

        write_report(json.loads(Path(args.out).read_text()), DOC, IMG, BEGIN, END)
        print(f"[quality] rewrote {DOC} from {args.out}")
        return 0
    t0 = time.perf_counter()
    trained = {ds: train_dataset(ds, args.retrain and args.stage != "eval") for ds in datasets}
    if args.stage == "train":
        print(json.dumps(trained, indent=2))
        return 0
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "config": {
            "jobs": {ds: {k: DATASETS[ds][k] for k in ("base", "twinflow")} for ds in datasets},
            "samples_per_class": args.samples_per_class,
            "seed": args.seed,
            "machine": "2-core CPU, no GPU",
        },
        "targets": TARGETS,
        "training": trained,
        "datasets": {},
    }
    evaluated = evaluate_all(datasets, trained, args.samples_per_class, args.actors, args.seed)
    results["eval_wall_s"] = evaluated.pop("_eval_wall_s")
    for ds in datasets:
        res = evaluated[ds]
        res["arms"] = {arm: res["arms"][arm] for arm in ARMS}
        res["targets"] = check_targets(ds, res["arms"])
        res["effective_guidance"] = measure_guidance(ds, trained[ds])
        res["date"] = results["date"]
        results["datasets"][ds] = res
    results["total_wall_s"] = round(time.perf_counter() - t0, 1)
    from _paths import repo_relative  # sibling module benchmarks/_paths.py

    results = repo_relative(results, ROOT)
    out = Path(args.out)
    if out.is_file():  # a run of fewer datasets keeps the others' earlier figures, with their own date
        earlier = json.loads(out.read_text())
        for ds, res in earlier.get("datasets", {}).items():
            if ds not in results["datasets"]:
                res.setdefault("date", earlier.get("date"))
                results["datasets"][ds] = res
                results["training"].setdefault(ds, earlier["training"][ds])
                results["config"]["jobs"].setdefault(ds, earlier["config"]["jobs"][ds])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    from quality_report import write_report  # sibling module benchmarks/quality_report.py

    write_report(results, DOC, IMG, BEGIN, END)
    print(f"[quality] wrote {out} and {DOC}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
