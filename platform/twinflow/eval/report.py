"""Eval outputs: results.json, results.md (one table), sample grids (PNG), samples (npz, uint8)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from twinflow.atomic_files import write_json_atomic
from twinflow.eval.datasets import get_dataset
from twinflow.imaging import to_uint8


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def save_samples(out_dir: Path, name: str, nfe: int, images: torch.Tensor, classes: Sequence[int]) -> Path:
    """All generated images of one (checkpoint, NFE) as uint8 (N, H, W, C) with their classes."""
    path = Path(out_dir) / "samples" / f"{_safe(name)}_nfe{nfe}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=to_uint8(images), classes=np.asarray(classes, dtype=np.int64))
    return path


def load_samples(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """(images (N, C, H, W) in [-1, 1], classes) from `save_samples`."""
    d = np.load(path)
    x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, d["classes"]


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(report: dict[str, Any]) -> str:
    """One row per (checkpoint, NFE). FD / diversity in the judge's space, then in the second
    (autoencoder) space when the report has it ("-" for datasets without one, e.g. emoji)."""
    second = any("feature_space" in d for d in report["datasets"].values())
    lines = [
        "| checkpoint | dataset | method | sampler | NFE | FD (lower is better) | FD floor | "
        "adherence | diversity (real = 1) | collapsed classes |"
        + (" FD, AE space | FD floor, AE space | diversity, AE space |" if second else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if second else ""),
    ]
    for e in report["checkpoints"]:
        method = e.get("method") or "?"
        if e.get("lambda") is not None and method == "twinflow":
            method += f" (lambda {e['lambda']:g})"
        for nfe, m in e["nfe"].items():
            lines.append(
                f"| {e['name']} | {e['dataset']} | {method} | {e['sampler']} | {nfe} | {fmt(m['fd'])} | "
                f"{fmt(e['floor']['fd'])} | {m['adherence']:.1%} | {fmt(m['diversity'])} | "
                f"{m['collapse']:.0%} |"
                + (
                    f" {fmt(m.get('fd_ae'))} | {fmt(e['floor'].get('fd_ae'))} | {fmt(m.get('diversity_ae'))} |"
                    if second
                    else ""
                )
            )
    for ds, d in report["datasets"].items():
        judge = d["judge"]
        acc = (judge.get("heldout") or {}).get("accuracy")
        floor = d.get("floor") or {}
        lines.append(
            f"| *real train images* | {ds} | - | - | - | {fmt(floor.get('fd'))} | {fmt(floor.get('fd'))} | "
            f"{fmt(acc) if acc is None else f'{acc:.1%}'} (judge held-out acc.) | "
            f"{fmt(floor.get('diversity'))} | - |"
            + (
                f" {fmt(floor.get('fd_ae'))} | {fmt(floor.get('fd_ae'))} | {fmt(floor.get('diversity_ae'))} |"
                if second
                else ""
            )
        )
    edits = [(e["name"], e["edits"]) for e in report["checkpoints"] if e.get("edits")]
    if edits:
        lines += [
            "",
            "| checkpoint | NFE | edit MSE | edit PSNR (dB) | class kept |",
            "|---|---|---|---|---|",
        ]
        for name, ed in edits:
            for key in sorted(k for k in ed if k.startswith("edit_mse_nfe")):
                n = key.rsplit("nfe", 1)[1]
                lines.append(
                    f"| {name} | {n} | {fmt(ed[key], 4)} | {fmt(ed.get(f'edit_psnr_nfe{n}'), 2)} | "
                    f"{ed.get(f'edit_class_kept_nfe{n}', float('nan')):.1%} |"
                )
    return "\n".join(lines) + "\n"


def class_grid(
    blocks: Sequence[tuple[str, torch.Tensor, np.ndarray]],
    class_names: Sequence[str],
    per_class: int,
    path: str | Path,
    scale: int = 2,
    label_width: int = 110,
) -> Path:
    """One row per class; one block of `per_class` columns per (title, images, classes), e.g. per NFE.
    Column j of every block holds the class's j-th sample, so blocks with the same noise line up."""
    prepared = []
    for title, x, classes in blocks:
        classes = np.asarray(classes)
        prepared.append((title, to_uint8(x), classes))
    present = sorted(set().union(*[set(c.tolist()) for _, _, c in prepared]))
    h, w = prepared[0][1].shape[1] * scale, prepared[0][1].shape[2] * scale
    pad, gap, head = 2, 10, 16
    block_w = per_class * (w + pad)
    canvas = Image.new(
        "RGB", (label_width + len(prepared) * (block_w + gap), head + len(present) * (h + pad)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for b, (title, imgs, classes) in enumerate(prepared):
        x0 = label_width + b * (block_w + gap)
        draw.text((x0, 2), title, fill="black")
        for r, c in enumerate(present):
            idx = np.flatnonzero(classes == c)[:per_class]
            for j, i in enumerate(idx):
                img = imgs[i]
                tile = (
                    Image.fromarray(img[..., 0], mode="L")
                    if img.shape[-1] == 1
                    else Image.fromarray(img, mode="RGB")
                )
                canvas.paste(
                    tile.convert("RGB").resize((w, h), Image.NEAREST),
                    (x0 + j * (w + pad), head + r * (h + pad)),
                )
    for r, c in enumerate(present):
        name = class_names[c] if c < len(class_names) else str(c)
        draw.text((4, head + r * (h + pad) + h // 2 - 6), name[:18], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_grid(report_entry: dict[str, Any], per_class: int, path: Path) -> Path | None:
    """Rows = classes, one block per NFE with the first `per_class` samples (same noise across blocks)."""
    blocks = []
    for nfe, sample_path in report_entry.get("samples", {}).items():
        x, classes = load_samples(sample_path)
        blocks.append((f"{nfe} NFE", x, classes))
    if not blocks:
        return None
    return class_grid(blocks, get_dataset(report_entry["dataset"]).class_names, per_class, path)


def write_reports(report: dict[str, Any], out_dir: Path, grid_per_class: int) -> None:
    out_dir = Path(out_dir)
    grids = []
    if grid_per_class:
        for e in report["checkpoints"]:
            g = write_grid(e, grid_per_class, out_dir / "grids" / f"{_safe(e['name'])}.png")
            if g is not None:
                e["grid"] = str(g)
                grids.append(str(g))
    md = markdown_table(report)
    report["markdown"] = md
    report["files"] = {
        "json": str(out_dir / "results.json"),
        "markdown": str(out_dir / "results.md"),
        "grids": grids,
    }
    (out_dir / "results.md").write_text(md)
    write_json_atomic(out_dir / "results.json", report, indent=2, default=str)
