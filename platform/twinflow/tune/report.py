"""A finished (or partly finished) sweep -> results table, metric plot, best trial's samples and export.

report/results.csv        one row per trial x eval setting (long format; stopped trials included)
report/results.md         one row per trial: params, status, loss, then FD / adherence per setting
report/<metric>_vs_<axis>.png   the sweep metric's family against the plot axis, one line per setting
report/best/export/       the best trial's export (`twinflow serve` / load_generator read it directly)
report/best/samples.png   its sample grid: one row per eval setting
report/best.json          trial id, params, metrics, paths
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import matplotlib
import matplotlib.pyplot as plt

from twinflow.atomic_files import write_json_atomic, write_text_atomic
from twinflow.tune.config import EvalSetting, Sweep, local_sweep_dir
from twinflow.tune.trainable import EVAL_GRID, trials_dir


@dataclass
class SweepResult:
    experiment_path: str
    report_dir: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    resumed: bool = False
    released: list[dict[str, Any]] = field(default_factory=list)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def trial_records(sweep: Sweep, results: Iterable[Any]) -> list[dict[str, Any]]:
    """One dict per trial from Tune's results (ResultGrid items or anything with .config/.metrics/.error)."""
    out = []
    for r in results:
        m = dict(r.metrics or {})
        trial_id = m.get("trial_id") or (Path(r.path).name if getattr(r, "path", None) else "?")
        if getattr(r, "error", None) is not None:
            status = "errored"
        elif _num(m.get("evaluated")) == 1:
            status = "finished"
        else:  # Tune marks a trial its scheduler stopped as done; an interrupted one is not
            where = f" at step {int(m['step'])}" if _num(m.get("step")) is not None else ""
            status = ("stopped" if m.get("done") else "unfinished") + where
        run_dir = Path(sweep_trials_dir(sweep)) / f"{sweep.name}-{trial_id}"
        out.append(
            {
                "trial_id": trial_id,
                "status": status,
                "params": {k: r.config.get(k) for k in sweep.config.search_space},
                "metrics": m,
                "run_dir": str(run_dir),
                "error": str(r.error) if getattr(r, "error", None) else None,
            }
        )
    key = sweep.config.x_axis
    out.sort(key=lambda t: (_sortable(t["params"].get(key)), t["trial_id"]))
    return out


def sweep_trials_dir(sweep: Sweep) -> str:
    return trials_dir(str(local_sweep_dir(sweep)))


def _sortable(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, str(v))


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}"
    return str(v)


def best_trial(sweep: Sweep, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    cfg = sweep.config
    scored = [
        t
        for t in trials
        if t["status"] == "finished"
        and _num(t["metrics"].get(cfg.metric)) is not None
        and math.isfinite(t["metrics"][cfg.metric])
    ]
    if not scored:
        return None
    pick = min if cfg.mode == "min" else max
    return pick(scored, key=lambda t: t["metrics"][cfg.metric])


LABELS = {
    "fd": "FD",
    "adherence": "adh.",
    "diversity": "div.",
    "collapse": "collapse",
    "pcafd": "PCA-FD",
    "pcaadh": "PCA-adh.",
}
AXIS_LABELS = {
    "fd": "Fréchet distance (judge features)",
    "adherence": "adherence (judge)",
    "diversity": "diversity (1 = real)",
    "pcafd": "Fréchet distance (pixel PCA)",
    "pcaadh": "adherence (nearest centroid)",
}


def families(sweep: Sweep, trials: list[dict[str, Any]]) -> list[str]:
    """Per-setting metric families: the evaluator's, or (custom evaluator) those found in the results."""
    known = list(sweep.config.evaluation.families)
    if known:
        return known
    suffixes = [s.suffix for s in sweep.config.evaluation.settings()]
    found: list[str] = []
    for t in trials:
        for k in t["metrics"]:
            for suf in suffixes:
                if k.startswith("eval/") and k.endswith("_" + suf):
                    fam = k[len("eval/") : -len(suf) - 1]
                    if fam not in found:
                        found.append(fam)
    return found


def plot_family(sweep: Sweep, fams: list[str]) -> str | None:
    """The family of the sweep metric when it is an eval metric, else the first one."""
    metric = sweep.config.metric
    for fam in sorted(fams, key=len, reverse=True):
        if metric.startswith(f"eval/{fam}_"):
            return fam
    return fams[0] if fams else None


def long_rows(sweep: Sweep, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    fams = families(sweep, trials)
    rows = []
    for t in trials:
        m = t["metrics"]
        for s in sweep.config.evaluation.settings():
            rows.append(
                {
                    "trial_id": t["trial_id"],
                    "status": t["status"],
                    **t["params"],
                    "step": _num(m.get("step")),
                    "total": _num(m.get("total")),
                    "nfe": s.nfe,
                    "style": s.style,
                    "rho": s.rho,
                    **{f: _num(m.get(f"eval/{f}_{s.suffix}")) for f in fams},
                    **{f"{f}_floor": _num(m.get(f"eval/{f}_floor")) for f in fams if f"eval/{f}_floor" in m},
                    "train_s": _num(m.get("train_s")),
                    "eval_s": _num(m.get("eval_s")),
                }
            )
    return rows


def _label(s: EvalSetting) -> str:
    return f"{s.nfe} NFE" + ("" if s.suffix == f"nfe{s.nfe}" else f" {s.style} rho {s.rho:g}")


def markdown_table(sweep: Sweep, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> str:
    settings = sweep.config.evaluation.settings()
    axes = list(sweep.config.search_space)
    fams = [f for f in families(sweep, trials) if f != "collapse"][:3]
    head = (
        ["trial"]
        + axes
        + ["status", "loss"]
        + [f"{LABELS.get(f, f)} {_label(s)}" for f in fams for s in settings]
        + ["train s"]
    )
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < len(axes) + 2 else "---:" for i in range(len(head))) + "|",
    ]
    for t in trials:
        m = t["metrics"]
        mark = "**" if best is not None and t is best else ""
        cells = (
            [f"{mark}{t['trial_id']}{mark}"]
            + [_fmt(t["params"].get(a)) for a in axes]
            + [t["status"], _fmt(_num(m.get("total")))]
            + [
                _fmt(_num(m.get(f"eval/{f}_{s.suffix}")), 4 if "fd" in f else 3)
                for f in fams
                for s in settings
            ]
            + [_fmt(_num(m.get("train_s")), 3)]
        )
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for f in families(sweep, trials):
        vals = [_num(t["metrics"].get(f"eval/{f}_floor")) for t in trials]
        vals = [v for v in vals if v is not None]
        if vals:
            notes.append(
                f"{LABELS.get(f, f)} of real images (the floor at this sample size): {_fmt(vals[0], 4)}"
            )
    if best is not None:
        notes.append(f"best ({sweep.config.metric}, {sweep.config.mode}): trial {best['trial_id']}")
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "") + "\n"


def plot_metric(sweep: Sweep, trials: list[dict[str, Any]], path: Path, family: str) -> Path | None:
    """`family` (e.g. fd) against the plot axis, one line per eval setting; the real-image floor dashed."""
    matplotlib.use("Agg")
    cfg = sweep.config
    axis = cfg.x_axis
    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    plotted: list[float] = []
    for s in cfg.evaluation.settings():
        pts: dict[float, list[float]] = {}
        for t in trials:
            x, y = t["params"].get(axis), _num(t["metrics"].get(f"eval/{family}_{s.suffix}"))
            if isinstance(x, (int, float)) and y is not None and math.isfinite(y):
                pts.setdefault(float(x), []).append(y)
        if not pts:
            continue
        xs = sorted(pts)
        plotted += [y for v in pts.values() for y in v]
        (line,) = ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=_label(s))
        for x in xs:
            if len(pts[x]) > 1:
                ax.scatter([x] * len(pts[x]), pts[x], color=line.get_color(), s=10, alpha=0.5)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    floor = [_num(t["metrics"].get(f"eval/{family}_floor")) for t in trials]
    floor = [f for f in floor if f is not None]
    if floor:
        ax.axhline(floor[0], color="gray", ls="--", lw=1, label="real images")
    if axis == "method.lambda":
        ax.axvline(1 / 3, color="gray", ls=":", lw=1, label="paper: 1/3")
    ys = [y for y in plotted if y > 0]
    if "fd" in family and ys and max(ys) / min(ys) > 5:
        ax.set_yscale("log")  # diverged trials would flatten the rest
    ax.set_xlabel(axis)
    ax.set_ylabel(AXIS_LABELS.get(family, family))
    ax.set_title(f"{sweep.name}: {family} vs {axis}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_best(sweep: Sweep, best: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Copy the best trial's export (adding a `sweep` entry to its twinflow.json) and sample grids."""
    run_dir = Path(best["run_dir"])
    info: dict[str, Any] = {
        "trial_id": best["trial_id"],
        "params": best["params"],
        "metric": sweep.config.metric,
        "mode": sweep.config.mode,
        "value": best["metrics"].get(sweep.config.metric),
        "metrics": {k: v for k, v in best["metrics"].items() if _num(v) is not None},
        "run_dir": str(run_dir),
    }
    export = run_dir / "export"
    if export.is_dir():
        dest = out_dir / "best" / "export"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(export, dest)
        meta_file = dest / "twinflow.json"
        meta = json.loads(meta_file.read_text())
        meta["sweep"] = {
            "name": sweep.name,
            "trial_id": best["trial_id"],
            "params": best["params"],
            "metric": sweep.config.metric,
            "value": info["value"],
        }
        write_json_atomic(meta_file, meta, indent=2, sort_keys=True, default=str)
        info["export"] = str(dest)
    for src, name in (
        (run_dir / EVAL_GRID, "samples.png"),
        (run_dir / "samples" / "final.png", "training_final.png"),
    ):
        if src.is_file():
            (out_dir / "best").mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out_dir / "best" / name)
            info[name.removesuffix(".png")] = str(out_dir / "best" / name)
    return info


def write_report(sweep: Sweep, results: Iterable[Any], out_dir: Path):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = trial_records(sweep, results)
    best = best_trial(sweep, trials)
    rows = long_rows(sweep, trials)
    if rows:
        with (out_dir / "results.csv").open("w", newline="") as fh:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # stopped trials lack the floors
            w = csv.DictWriter(fh, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)
    write_text_atomic(out_dir / "results.md", markdown_table(sweep, trials, best))
    family = plot_family(sweep, families(sweep, trials))
    plot = (
        plot_metric(
            sweep, trials, out_dir / f"{family}_vs_{sweep.config.x_axis.replace('.', '_')}.png", family
        )
        if family
        else None
    )
    info = None
    if best is not None:
        info = export_best(sweep, best, out_dir)
        info["plot"] = str(plot) if plot else None
        write_json_atomic(out_dir / "best.json", info, indent=2, default=str)
    else:
        (out_dir / "best.json").unlink(missing_ok=True)
    print_summary(sweep, trials, best, out_dir)
    return SweepResult(experiment_path="", report_dir=str(out_dir), rows=rows, best=info)


def print_summary(
    sweep: Sweep, trials: list[dict[str, Any]], best: dict[str, Any] | None, out_dir: Path
) -> None:
    counts: dict[str, int] = {}
    for t in trials:
        key = t["status"].split(" at ")[0]
        counts[key] = counts.get(key, 0) + 1
    lines = [f"[twinflow] sweep {sweep.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    if best is not None:
        lines.append(
            f"  best trial      {best['trial_id']} {best['params']} "
            f"{sweep.config.metric}={_fmt(best['metrics'].get(sweep.config.metric))}"
        )
    for name in ("results.md", "results.csv", "best/export", "best/samples.png"):
        if (out_dir / name).exists():
            lines.append(f"  {name:<15} {out_dir / name}")
    print("\n".join(lines), flush=True)
