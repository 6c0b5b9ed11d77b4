"""Tables, plots and grids of benchmarks/quality.py's results into docs/evaluation.md (between markers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
SHORT = {"base": "base", "twinflow": "TwinFlow"}
GRID_BLOCKS = [
    ("base", "1"),
    ("base", "4"),
    ("base", "50"),
    ("twinflow", "1"),
    ("twinflow", "2"),
    ("twinflow", "4"),
]


def _f(v: float | None, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:.0f}"


def table(ds: str, res: dict[str, Any]) -> str:
    """FD and diversity in the judge's space, then in the second (autoencoder) space where measured."""
    arms = res["arms"]
    floor = arms["base"]["floor"]
    second = "fd_ae" in floor
    lines = [
        "| model | sampler | NFE | Fréchet distance ↓ | adherence ↑ | diversity (real = 1) | saturated pixels "
        "| collapsed classes |" + (" FD, AE space ↓ | diversity, AE space |" if second else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if second else ""),
    ]
    for a in arms.values():
        sampler = a["sampler"] + (f", CFG {1 + a['guidance']:g}" if a.get("guidance") else "")
        for nfe, m in a["nfe"].items():
            lines.append(
                f"| {a['label']} | {sampler} | {nfe} | {_f(m['fd'])} | {m['adherence']:.1%} | "
                f"{_f(m['diversity'])} | {m.get('saturation', float('nan')):.3f} | {m['collapse']:.0%} |"
                + (f" {_f(m.get('fd_ae'))} | {_f(m.get('diversity_ae'))} |" if second else "")
            )
    acc = res.get("judge_accuracy")
    lines.append(
        f"| *real images (floor)* | - | - | {_f(floor['fd'])} | "
        f"{'-' if acc is None else f'{acc:.1%}'} (judge held-out accuracy) | {_f(floor['diversity'])} | "
        f"{floor.get('saturation', float('nan')):.3f} | - |"
        + (f" {_f(floor.get('fd_ae'))} | {_f(floor.get('diversity_ae'))} |" if second else "")
    )
    return "\n".join(lines)


def targets_text(ds: str, res: dict[str, Any], targets: dict[str, float]) -> str:
    t = res["targets"]
    arms = res["arms"]
    base50 = arms["base"]["nfe"]["50"]["fd"]
    tf1 = arms["twinflow"]["nfe"]["1"]
    ok = lambda flag: "met" if flag else "missed"  # noqa: E731
    lines = [
        f"- Base 50-NFE adherence **{t['base_adherence_50nfe']:.1%}** (target >= "
        f"{targets['base_adherence_min'][ds]:.0%}): **{ok(t['base_adherence_ok'])}**",
        f"- TwinFlow 1-NFE Fréchet distance {_f(tf1['fd'])} vs the base's 50-NFE {_f(base50)}: "
        f"ratio **{t['fd_ratio_1nfe_vs_base50']:.2f}** (target <= {targets['fd_ratio_max']}): "
        f"**{'met' if t['fd_ok'] else 'missed'}**",
        f"- TwinFlow 1-NFE diversity **{_f(t['diversity_1nfe'])}** x real (target >= {targets['diversity_min']}): "
        f"**{'met' if t['diversity_ok'] else 'missed'}**",
    ]
    if "fd_ae_ratio_1nfe_vs_base50" in t:
        lines += [
            f"- In the second feature space (autoencoder, no labels): TwinFlow 1-NFE FD {_f(tf1['fd_ae'])} vs the "
            f"base's 50-NFE {_f(arms['base']['nfe']['50']['fd_ae'])}: ratio **{t['fd_ae_ratio_1nfe_vs_base50']:.2f}** "
            f"(target <= {targets['fd_ratio_max']}): **{ok(t['fd_ae_ok'])}**",
            f"- In the second feature space: TwinFlow 1-NFE diversity **{_f(t['diversity_ae_1nfe'])}** x real "
            f"(target >= {targets['diversity_min']}): **{ok(t['diversity_ae_ok'])}**",
        ]
    if "saturation_ratio_1nfe" in t:
        lines.append(
            f"- TwinFlow 1-NFE saturated pixels **{t['saturation_ratio_1nfe']:.2f}x** real (target within "
            f"{targets['saturation_ratio_max']:g}x): **{ok(t['saturation_ok'])}**"
        )
    g = res.get("effective_guidance")
    if g:
        lines.append(
            f"- Guidance baked in by the fine-tune, against the base on held-out images: scale "
            f"**{g['scale']:.2f}** ("
            + ", ".join(f"t={k[7:]}: {v:.2f}" for k, v in g.items() if k.startswith("scale_t"))
            + ")"
        )
    if "adherence_1nfe" in t:
        lines.append(
            f"- TwinFlow 1-NFE adherence **{t['adherence_1nfe']:.1%}** (target >= "
            f"{targets['mnist_adherence_min']:.0%}): **{'met' if t['adherence_ok'] else 'missed'}**"
        )
    return "\n".join(lines)


def plot(ds: str, res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = res["arms"]
    floor = arms["base"]["floor"]
    keys = ["fd", "adherence", "diversity"]
    titles = ["Fréchet distance (judge features) ↓", "prompt adherence ↑", "diversity (real = 1)"]
    if "fd_ae" in floor:
        keys += ["fd_ae", "diversity_ae"]
        titles += ["Fréchet distance (AE features) ↓", "diversity, AE space (real = 1)"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for a in arms.values():
        nfes = [int(n) for n in a["nfe"]]
        for ax, key in zip(axes, keys):
            ax.plot(nfes, [a["nfe"][str(n)][key] for n in nfes], "o-", label=f"{a['label']} ({a['sampler']})")
    for i, key in enumerate(keys):
        if key.startswith("fd"):
            axes[i].axhline(floor[key], color="gray", ls="--", label="real train images (floor)")
            axes[i].set_yscale("log")
        if key.startswith("diversity"):
            axes[i].axhline(1.0, color="gray", ls="--", label="real data")
    if res.get("judge_accuracy") is not None:
        axes[1].axhline(res["judge_accuracy"], color="gray", ls="--", label="judge accuracy on real")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 50])
        ax.set_xticklabels(["1", "2", "4", "50"])
        ax.set_xlabel("NFE")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{NAMES.get(ds, ds)}: TwinFlow vs its flow-matching base", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid(ds: str, res: dict[str, Any], path: Path, per_class: int = 3) -> Path:
    from twinflow.eval.datasets import get_dataset
    from twinflow.eval.report import class_grid, load_samples

    blocks = []
    for arm, nfe in GRID_BLOCKS:
        a = res["arms"].get(arm)
        if a and nfe in a.get("samples", {}):
            x, classes = load_samples(a["samples"][nfe])
            blocks.append((f"{SHORT[arm]} {nfe} NFE", x, classes))
    return class_grid(blocks, get_dataset(ds).class_names, per_class, path)


def write_report(results: dict[str, Any], doc: Path, img: Path, begin: str, end: str) -> None:
    cfg = results["config"]
    jobs = "; ".join(
        f"{NAMES.get(ds, ds)}: `{j['base']}` then `{j['twinflow']}`" for ds, j in cfg["jobs"].items()
    )
    parts = [
        begin,
        "",
        f"Measured {results.get('date', '')} by `.venv/bin/python benchmarks/quality.py` (the shipped jobs as "
        f"they are: {jobs}; {cfg['samples_per_class']} samples per class per NFE, seed {cfg['seed']}, the same "
        f"noise for every arm); raw numbers in `benchmarks/results/quality.json`; total wall time "
        f"{results.get('total_wall_s', 0) / 60:.0f} min on {cfg['machine']}"
        + (
            " (training runs marked *reused* below ran earlier with identical job configs, e.g. in `make demo`; "
            "their wall time is not in this total)"
            if any(v.get("reused") for t in results["training"].values() for v in t.values())
            else ""
        )
        + ".",
        "",
    ]
    for ds, res in results["datasets"].items():
        name = NAMES.get(ds, ds)
        p = plot(ds, res, img / f"quality_{ds}.png")
        g = grid(ds, res, img / f"quality_{ds}_grid.png")
        train = results["training"][ds]
        times = ", ".join(
            f"{SHORT.get(k, k)} {v['wall_s']} s" + (" (reused)" if v.get("reused") else "")
            if v.get("wall_s") is not None
            else f"{SHORT.get(k, k)}: run by `make demo` (timed there)"
            for k, v in train.items()
        )
        when = res.get("date")
        parts += [
            f"### {name}",
            "",
            *(
                [
                    f"*Measured {when}, before this run: its figures are from that date's code and models "
                    "(no second feature space where its columns are missing).*",
                    "",
                ]
                if when and when != results.get("date")
                else []
            ),
            table(ds, res),
            "",
            targets_text(ds, res, results["targets"]),
            "",
            f"Training wall time per job, Ray start-up included (2 Ray Train workers): {times}.",
            "",
            f"![{name} metrics per NFE](img/{p.name})",
            "",
            f"![{name} samples: rows are classes; each block is one model at one NFE, same noise per column]"
            f"(img/{g.name})",
            "",
        ]
    parts.append(end)
    section = "\n".join(parts)
    text = doc.read_text() if doc.is_file() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
