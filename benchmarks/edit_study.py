"""Edit study: why the MNIST editor misses flips and rotations, and what budget reaches 90% per op.

Two parts, both trained in this process (`twinflow.train.inprocess`, one thread, the data in memory)
from the shipped edit jobs (`jobs/mnist_edit_fm.yaml`, then `jobs/mnist_edit_twinflow.yaml` on its
sampling EMA), with one micro-batch of 64 per step: the shipped jobs' global batch (2 Ray Train
workers x 32).

1. **Probe** (`--variants probe`, or one arm as `probe_<arm>`): flow-matching editors trained on the
   flip and rotate pairs only, in arms that differ in how the source image reaches the model. A flip or rotation of the
   28x28 image is a move of its 4x4 patches on the 7x7 token grid *and* the same flip or rotation of
   the pixels inside each patch. `given`: the source as shipped. `blocks_placed`: the source's patches
   already moved to where the edit puts them (left for the model: the pixels inside each patch, a
   per-token map like invert's). `pixels_placed`: the pixels inside each patch already transformed,
   the patches where they were (left for the model: moving tokens to the mirrored/rotated position).
   `given_layers6`, `given_patch2`: the source as shipped to a 6-layer backbone, or with 2x2 patches.
   Scored on the held-out flip and rotate pairs, their sources given the same way.
2. **Variants** (`--variants shipped,layers6,...`): the FM editor then its TwinFlow fine-tune, per
   named set of job overrides (`VARIANTS`), scored by `twinflow.eval.edits.evaluate_editor` on the
   same held-out pairs with the same noise: per op PSNR and the class the judge reads, TwinFlow at
   1/2 NFE, the FM editor on its ODE at 2 and 50 NFE. The exports stay under runs/edit_study/.

Each finished probe arm or variant is written to benchmarks/results/edit_study.json at once; a rerun
skips those already there with the same settings (`--fresh` starts over). `--report` rewrites the tables
of docs/edit-study.md (between its EDIT_STUDY markers) and docs/img/edit_study.png from the JSON.

    .venv/bin/twinflow data build pipelines/mnist_edits.yaml
    .venv/bin/python benchmarks/edit_study.py --variants probe,shipped,layers6,fm_steps3000
    .venv/bin/python benchmarks/edit_study.py --report
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _paths import repo_relative  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "edit_study.json"
DOC = ROOT / "docs" / "edit-study.md"
PLOT = ROOT / "docs" / "img" / "edit_study.png"
FM_JOB, TF_JOB = "jobs/mnist_edit_fm.yaml", "jobs/mnist_edit_twinflow.yaml"
DATA = "data/mnist_edits"
RUNS = "runs/edit_study"
PATCH = 4  # tiny-28g's patch: the probe moves 4x4 blocks
BEGIN, END = "<!-- EDIT_STUDY:BEGIN -->", "<!-- EDIT_STUDY:END -->"
OPS = ["invert", "shift", "thicker", "thinner", "flip", "rotate"]
TARGET_CLASS = 0.90  # the judge reads the instructed class in >= 90% of 2-NFE outputs, every op
COMMON = ["train.micro_batch=64"]  # the shipped global batch: 2 Ray Train workers x 32


@dataclass(frozen=True)
class Variant:
    """Job overrides for the FM editor and its TwinFlow fine-tune (`model` ones apply to both)."""

    about: str
    fm: tuple[str, ...] = ()
    twinflow: tuple[str, ...] = ()
    model: tuple[str, ...] = ()


VARIANTS: dict[str, Variant] = {
    "shipped": Variant(
        "the shipped jobs (tiny-28g: 3 layers, 4x4 patches, width 64; FM 1500 + TwinFlow 300 steps)"
    ),
    "fm_steps3000": Variant("FM editor 3000 steps (2x), TwinFlow 300", fm=("train.steps=3000",)),
    "layers6": Variant("6 layers instead of 3", model=("model.backbone={num_layers: 6}",)),
    "layers6_fm3000": Variant(
        "6 layers, FM editor 3000 steps", fm=("train.steps=3000",), model=("model.backbone={num_layers: 6}",)
    ),
    "patch2": Variant("2x2 patches (196 tokens per image instead of 49)", model=("model.patch=2",)),
}


# ------------------------------------------------------------------------------------------------ probe
# A geometric edit as a map on two axes of a tensor: applied to the pixel axes it is the edit itself,
# applied to the axes of the patch grid it moves whole patches and leaves their pixels alone.
GEOMETRIC: dict[str, Callable[[Tensor, tuple[int, int]], Tensor]] = {
    "flip_h": lambda x, d: x.flip(d[1]),
    "flip_v": lambda x, d: x.flip(d[0]),
    "rot90": lambda x, d: x.rot90(1, d),
    "rot180": lambda x, d: x.rot90(2, d),
    "rot270": lambda x, d: x.rot90(3, d),
}


@dataclass(frozen=True)
class ProbeArm:
    """How the sources reach the model (`given`, `blocks_placed`, `pixels_placed`) and its overrides."""

    feed: str
    about: str  # what is left for the model to learn
    model: tuple[str, ...] = ()


PROBE_ARMS = {
    "given": ProbeArm(
        "given", "move the patches and transform the pixels inside them (the source as shipped)"
    ),
    "blocks_placed": ProbeArm(
        "blocks_placed", "transform the pixels inside each patch (patches already moved)"
    ),
    "pixels_placed": ProbeArm("pixels_placed", "move the patches (pixels inside them already transformed)"),
    "given_layers6": ProbeArm(
        "given", "both, as shipped, with 6 layers instead of 3", ("model.backbone={num_layers: 6}",)
    ),
    "given_patch2": ProbeArm(
        "given", "both, as shipped, with 2x2 patches (14x14 tokens of 4 pixels)", ("model.patch=2",)
    ),
}


def geometric_kind(source: Tensor, target: Tensor) -> Tensor:
    """Per pair (N, C, H, W): the index in `GEOMETRIC` of the transform that maps the source exactly
    onto the target, -1 for a pair no such transform explains (invert, shift, strokes)."""
    kind = torch.full((source.shape[0],), -1, dtype=torch.long)
    for i, fn in enumerate(GEOMETRIC.values()):
        hit = (fn(source, (-2, -1)) == target).flatten(1).all(1) & (kind < 0)
        kind[hit] = i
    return kind


def _blocks(x: Tensor, p: int) -> Tensor:
    """(N, C, H, W) -> (N, C, H/p, W/p, p, p): the patch grid, then the pixels inside a patch."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)


def _unblocks(b: Tensor) -> Tensor:
    n, c, gh, gw, p, _ = b.shape
    return b.permute(0, 1, 2, 4, 3, 5).reshape(n, c, gh * p, gw * p)


def route(source: Tensor, kind: Tensor, part: str, patch: int) -> Tensor:
    """Apply each pair's geometric edit (`kind`, from `geometric_kind`) to one part of its source:
    "blocks" moves whole patches on the grid, "pixels" transforms the pixels inside each patch.
    Both parts together give the edit itself; rows with kind -1 stay as they are."""
    if part not in ("blocks", "pixels"):
        raise ValueError(f"part must be 'blocks' or 'pixels', not {part!r}")
    out = source.clone()
    dims = (2, 3) if part == "blocks" else (4, 5)
    for i, fn in enumerate(GEOMETRIC.values()):
        rows = kind == i
        if rows.any():
            out[rows] = _unblocks(fn(_blocks(source[rows], patch), dims))
    return out


def probe_arm_data(data: Any, arm: str, patch: int) -> Any:
    """The flip/rotate rows of an in-memory edit split (`train.inprocess.MemoryData`), their sources
    as the probe arm gives them."""
    kind = geometric_kind(data.refs, data.images)
    rows = torch.nonzero(kind >= 0).squeeze(1)
    refs = data.refs[rows]
    if arm == "blocks_placed":
        refs = route(refs, kind[rows], "blocks", patch)
    elif arm == "pixels_placed":
        refs = route(refs, kind[rows], "pixels", patch)
    return replace(
        data,
        images=data.images[rows],
        labels=data.labels[rows],
        caption_ids=data.caption_ids[rows],
        refs=refs,
    )


def probe_pairs(pairs: Any, arm: str, patch: int) -> Any:
    """The held-out flip/rotate pairs (`eval.edits.EditPairs`), sources as the arm gives them."""
    kind = geometric_kind(pairs.source, pairs.target)
    keep = torch.nonzero(kind >= 0).squeeze(1)
    idx = keep.tolist()
    source = pairs.source[keep]
    if arm in ("blocks_placed", "pixels_placed"):
        source = route(source, kind[keep], arm.split("_")[0], patch)
    return replace(
        pairs,
        source=source,
        target=pairs.target[keep],
        instructions=[pairs.instructions[i] for i in idx],
        labels=pairs.labels[keep],
        ids=[pairs.ids[i] for i in idx],
        ops=[pairs.ops[i] for i in idx],
    )


# -------------------------------------------------------------------------------------------- results
def settings_key(**settings: Any) -> str:
    """What a finished entry was measured with; an entry is reused only under the same key."""
    return json.dumps(settings, sort_keys=True)


def pending(results: Mapping[str, Any], names: Sequence[str], keys: Mapping[str, str]) -> list[str]:
    """The requested entries not yet in `results` under their current settings, in request order."""
    done = results.get("entries", {})
    return [n for n in names if done.get(n, {}).get("settings") != keys[n]]


def record(path: Path, name: str, entry: dict[str, Any], header: Mapping[str, Any]) -> dict[str, Any]:
    """Add one finished entry to the results file (created when missing) and write it at once."""
    from twinflow.atomic_files import write_json_atomic

    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(header)
    results.setdefault("entries", {})[name] = entry
    write_json_atomic(path, repo_relative(results, ROOT), indent=2)
    return results


def summary(per_nfe: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers kept per NFE: overall PSNR/MSE/judged class and the per-op ones."""
    keep = ("edit_mse", "edit_psnr", "edit_class_kept", "edit_label_kept", "sample_s", "sampler")
    return {
        str(n): {**{k: m[k] for k in keep if k in m}, "by_op": m.get("by_op", {})} for n, m in per_nfe.items()
    }


def verdict(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets for one variant: every op's judged class >= 90% at 2 NFE (TwinFlow), and
    TwinFlow's 2-NFE PSNR above the FM editor's at 50 NFE (overall and per op)."""
    tf, fm = entry["eval"]["twinflow"]["2"], entry["eval"]["fm"]["50"]
    short = {op: v["edit_class_kept"] for op, v in tf["by_op"].items() if v["edit_class_kept"] < TARGET_CLASS}
    return {
        "every_op_class_90": not short,
        "ops_below_90": short,
        "psnr_above_fm50": tf["edit_psnr"] > fm["edit_psnr"],
        "ops_psnr_not_above_fm50": sorted(
            op
            for op, v in tf["by_op"].items()
            if v["edit_psnr"] <= fm["by_op"].get(op, {}).get("edit_psnr", -1)
        ),
    }


# -------------------------------------------------------------------------------------------- training
def load_jobs(variant: Variant) -> tuple[Any, Any]:
    from twinflow.train.config import load_job

    fm = load_job(ROOT / FM_JOB, [f"data.path={ROOT / DATA}", *COMMON, *variant.model, *variant.fm])
    tf = load_job(
        ROOT / TF_JOB,
        [f"data.path={ROOT / DATA}", "train.init_from=null", *COMMON, *variant.model, *variant.twinflow],
    )
    return fm, tf


def timed_train(job: Any, data: Any, enc: Any, model: Any = None) -> tuple[Any, dict[str, Any]]:
    from twinflow.train.inprocess import train_in_process

    t0 = time.perf_counter()
    run = train_in_process(job, data=data, encoder=enc, model=model, log_every=max(1, job.train.steps // 10))
    wall = time.perf_counter() - t0
    last = {k: round(v, 5) for k, v in run.history[-1].items()} if run.history else {}
    return run, {
        "steps": job.train.steps,
        "wall_s": round(wall, 1),
        "step_s": round(wall / job.train.steps, 4),
        "last_log": last,
    }


def run_variant(name: str, data: Any, enc: Any, pairs: Any, judge: Any, seed: int) -> dict[str, Any]:
    """FM editor -> export -> TwinFlow fine-tune of its sampling EMA -> export; both scored."""
    from twinflow.eval.edits import evaluate_editor
    from twinflow.export_reader import open_export
    from twinflow.train import modelling

    variant = VARIANTS[name]
    fm_job, tf_job = load_jobs(variant)
    out = ROOT / RUNS / name
    fm_run, fm_train = timed_train(fm_job, data, enc)
    fm_model = fm_run.sampling_model
    fm_export = modelling.export(fm_job, fm_model, out / "fm" / "export", steps=fm_job.train.steps)
    tf_run, tf_train = timed_train(tf_job, data, enc, model=copy.deepcopy(fm_model).train())
    tf_export = modelling.export(
        tf_job, tf_run.sampling_model, out / "twinflow" / "export", steps=tf_job.train.steps
    )
    evals, eval_s = {}, {}
    for arm, path, nfe in (("fm", fm_export, [2, 50]), ("twinflow", tf_export, [1, 2])):
        t0 = time.perf_counter()
        per_nfe, _ = evaluate_editor(open_export(path), pairs, nfe, judge, seed=seed)
        evals[arm], eval_s[arm] = summary(per_nfe), round(time.perf_counter() - t0, 1)
    params = sum(p.numel() for p in fm_model.parameters())
    entry = {
        "about": variant.about,
        "overrides": {
            "fm": [*COMMON, *variant.model, *variant.fm],
            "twinflow": [*COMMON, *variant.model, *variant.twinflow],
        },
        "parameters": params,
        "training": {"fm": fm_train, "twinflow": tf_train},
        "eval": evals,
        "eval_wall_s": eval_s,
        "exports": {"fm": str(fm_export), "twinflow": str(tf_export)},
    }
    entry["verdict"] = verdict(entry)
    return entry


def run_probe_arm(
    arm: str, data: Any, enc: Any, pairs: Any, judge: Any, seed: int, steps: int
) -> dict[str, Any]:
    """One probe arm: a flow-matching editor trained `steps` steps on the flip/rotate pairs as the arm
    gives them, scored on the held-out flip/rotate pairs (sources given the same way) at 2 and 50 NFE."""
    from twinflow.eval.edits import edit_metrics, sample_edits
    from twinflow.method.sampler import settings_for

    spec = PROBE_ARMS[arm]
    feed = spec.feed
    job, _ = load_jobs(Variant("probe", fm=(f"train.steps={steps}", *spec.model)))
    arm_data = probe_arm_data(data, feed, PATCH)
    run, train = timed_train(job, arm_data, enc)
    held = probe_pairs(pairs, feed, PATCH)
    per_nfe = {}
    for nfe in (2, 50):
        out = sample_edits(
            run.sampling_model, held, settings_for("flow_matching", nfe), encoder=enc, seed=seed
        )
        per_nfe[str(nfe)] = edit_metrics(out, held, judge, by_op=True)
    return {
        "about": spec.about,
        "steps": steps,
        "train_rows": len(arm_data),
        "held_out_pairs": len(held),
        "training": train,
        "eval": per_nfe,
    }


# ---------------------------------------------------------------------------------------------- report
def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def variant_table(results: Mapping[str, Any]) -> str:
    """One row per (variant, editor, NFE): overall PSNR and judged class, then per op."""
    rows = [
        "| variant | editor, NFE | PSNR (dB) | class | " + " | ".join(OPS) + " | train wall |",
        "|---|---|---|---|" + "---|" * len(OPS) + "---|",
    ]
    for name, e in variant_entries(results).items():
        tr = e["training"]
        wall = f"FM {tr['fm']['steps']} steps {tr['fm']['wall_s'] / 60:.1f} min, TF {tr['twinflow']['steps']} steps {tr['twinflow']['wall_s'] / 60:.1f} min"
        for arm, nfe, label in (
            ("fm", "50", "FM, 50"),
            ("fm", "2", "FM, 2"),
            ("twinflow", "1", "TwinFlow, 1"),
            ("twinflow", "2", "**TwinFlow, 2**"),
        ):
            m = e["eval"][arm][nfe]
            cells = [
                f"{m['by_op'][op]['edit_psnr']:.1f} / {pct(m['by_op'][op]['edit_class_kept'])}"
                if op in m["by_op"]
                else "-"
                for op in OPS
            ]
            rows.append(
                f"| {name} | {label} | {m['edit_psnr']:.2f} | {pct(m['edit_class_kept'])} | "
                + " | ".join(cells)
                + f" | {wall if label.startswith('FM, 50') else ''} |"
            )
    return "\n".join(rows)


def probe_entries(results: Mapping[str, Any]) -> dict[str, Any]:
    return {
        n.removeprefix("probe_"): e for n, e in results.get("entries", {}).items() if n.startswith("probe_")
    }


def variant_entries(results: Mapping[str, Any]) -> dict[str, Any]:
    return {n: e for n, e in results.get("entries", {}).items() if not n.startswith("probe_")}


def probe_table(arms: Mapping[str, Any]) -> str:
    rows = [
        "| arm | left for the model to learn | NFE | flip PSNR | flip class | rotate PSNR | rotate class | train wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, a in arms.items():
        for nfe, m in a["eval"].items():
            f, r = m["by_op"].get("flip", {}), m["by_op"].get("rotate", {})
            rows.append(
                f"| {arm} | {a['about']} | {nfe} | {f.get('edit_psnr', 0):.1f} | {pct(f.get('edit_class_kept'))} | "
                f"{r.get('edit_psnr', 0):.1f} | {pct(r.get('edit_class_kept'))} | {a['training']['wall_s'] / 60:.1f} min |"
            )
    return "\n".join(rows)


def plot(results: Mapping[str, Any], path: Path) -> Path | None:
    """Judged class per op at TwinFlow 2 NFE, one group of bars per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = variant_entries(results)
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(entries)
    for i, (name, e) in enumerate(entries.items()):
        by = e["eval"]["twinflow"]["2"]["by_op"]
        ax.bar(
            [j + i * width for j in range(len(OPS))],
            [100 * by.get(op, {}).get("edit_class_kept", 0) for op in OPS],
            width,
            label=name,
        )
    ax.axhline(100 * TARGET_CLASS, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(OPS))], OPS)
    ax.set_ylabel("judge reads the instructed class (%)")
    ax.set_title("TwinFlow editor, 2 NFE, held-out MNIST edit pairs")
    ax.legend(fontsize=8, ncol=len(entries))
    ax.set_ylim(0, 105)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: Mapping[str, Any]) -> None:
    parts = [BEGIN, ""]
    arms = probe_entries(results)
    if arms:
        first = next(iter(arms.values()))
        parts += [
            f"#### Probe: flip and rotate pairs only, flow matching {first['steps']} steps per arm, "
            f"{first['held_out_pairs']} held-out flip/rotate pairs (PSNR dB, judge reads the instructed class)",
            "",
            probe_table(arms),
            "",
        ]
    if variant_entries(results):
        parts += [
            f"#### Variants: {results['pairs']} held-out pairs, per op PSNR (dB) / judge reads the instructed class",
            "",
            variant_table(results),
            "",
        ]
        if plot(results, PLOT):
            parts += ["![judged class per op, TwinFlow 2 NFE, per variant](img/edit_study.png)", ""]
    parts.append(END)
    section = "\n".join(parts)
    text = DOC.read_text() if DOC.is_file() else f"# Edit study\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOC}: the {BEGIN} / {END} markers are missing")
    DOC.write_text(text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :])


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="probe,shipped", help=f"probe and/or {', '.join(VARIANTS)}")
    p.add_argument("--pairs", type=int, default=1000, help="held-out pairs scored (the eval split's first N)")
    p.add_argument("--probe-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="measure again what the results file already holds")
    p.add_argument("--report", action="store_true", help="only rewrite docs/edit-study.md from the JSON")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report:
        write_report(json.loads(out.read_text()))
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    names = [m for n in names for m in ([f"probe_{a}" for a in PROBE_ARMS] if n == "probe" else [n])]
    unknown = [
        n
        for n in names
        if n.removeprefix("probe_") not in (PROBE_ARMS if n.startswith("probe_") else VARIANTS)
    ]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from probe, {', '.join(VARIANTS)}")
    keys = {
        n: settings_key(
            name=n,
            pairs=args.pairs,
            seed=args.seed,
            common=COMMON,
            **(
                {"probe_steps": args.probe_steps}
                if n.startswith("probe_")
                else {"variant": VARIANTS[n].__dict__}
            ),
        )
        for n in names
    }
    results = {} if args.fresh or not out.is_file() else json.loads(out.read_text())
    todo = pending(results, names, keys)
    print(
        f"to measure: {todo or 'nothing'} (already in {out.name}: {sorted(set(names) - set(todo))})",
        flush=True,
    )
    if not todo:
        return 0

    from twinflow.eval.edits import load_edit_pairs
    from twinflow.eval.judges import load_judge
    from twinflow.models.text_encoder import TextEncoder
    from twinflow.train.inprocess import load_memory_data

    torch.set_num_threads(1)
    fm_job, _ = load_jobs(VARIANTS["shipped"])
    enc = TextEncoder(max_length=fm_job.data.text_max_length)
    data = load_memory_data(fm_job.data, enc)
    pairs = load_edit_pairs(str(ROOT / DATA), limit=args.pairs, image_size=28, channels=1)
    judge = load_judge("mnist")
    header = {
        "what": "benchmarks/edit_study.py: MNIST editors trained in process, scored on held-out edit pairs",
        "machine": f"CPU, torch threads {torch.get_num_threads()}, no GPU",
        "pairs": len(pairs),
        "pairs_per_op": {op: pairs.ops.count(op) for op in OPS},
        "seed": args.seed,
        "target_class_per_op": TARGET_CLASS,
    }
    if args.fresh and out.is_file():
        out.unlink()
    for name in todo:
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        if name.startswith("probe_"):
            entry = run_probe_arm(
                name.removeprefix("probe_"), data, enc, pairs, judge, args.seed, args.probe_steps
            )
        else:
            entry = run_variant(name, data, enc, pairs, judge, args.seed)
        entry.update(
            settings=keys[name], wall_s=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%d")
        )
        results = record(out, name, entry, header)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {entry['wall_s'] / 60:.1f} min", flush=True)
        print(
            probe_table({name: entry})
            if name.startswith("probe_")
            else variant_table({"entries": {name: entry}}),
            flush=True,
        )
    write_report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
