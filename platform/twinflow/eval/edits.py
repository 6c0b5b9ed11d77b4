"""Judge an image editor per NFE on held-out edit pairs: exact-target MSE/PSNR, the class the judge
reads, and a grid of reference | instruction | output per NFE | target.

Edit pairs (`pipelines/*_edits.yaml`) have an exact target, so an output is scored against it pixel for
pixel. The judge (`twinflow.eval.judges`) says whether the edit kept what the instruction keeps: the
"instructed class" of a pair is the class the judge reads in its exact target (a rotated or inverted
digit may read differently from the source digit; that is the instruction's doing, not the model's),
and `edit_class_kept` is the share of outputs the judge puts in that class. `edit_label_kept` compares
with the source's label instead, and `edit_label_kept_floor` is the exact targets' own score there.

`twinflow eval <edit export>` runs `run_edit_eval` (an export declares `"tasks": [..., "edit"]` when
its job trained on edit pairs); sweeps use `tune_evaluator` as `evaluation.evaluator`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from twinflow.atomic_files import write_json_atomic
from twinflow.data.config import DataConfig
from twinflow.data.local import iter_local_batches, read_split_manifest
from twinflow.data.shards import iter_shard_tables
from twinflow.eval.checkpoints import EvalInputError, find_export, infer_dataset, job_data
from twinflow.eval.datasets import SOURCE_TYPES
from twinflow.eval.judges import load_judge
from twinflow.eval.metrics import mse_psnr
from twinflow.eval.sampling import SAMPLER_METHODS, check_nfe, plan_units, resolve_sampler, sample_unit
from twinflow.export_reader import open_export, shared_text_encoder
from twinflow.imaging import to_pil, to_uint8
from twinflow.method.config import sample_guidance_of
from twinflow.method.sampler import settings_for

PSNR_CAP = 100.0  # dB, for an output equal to its target


@dataclass
class EditPairs:
    """Held-out edit pairs in memory: images (N, C, H, W) in [-1, 1]."""

    source: Tensor
    target: Tensor
    instructions: list[str]
    labels: Tensor  # the source's class, -1 when unknown
    ids: list[str]
    ops: list[str]  # each pair's edit op ("rotate", "invert", ...), "?" when the shards do not say

    def __len__(self) -> int:
        return int(self.source.shape[0])


def load_edit_pairs(
    path: str,
    *,
    split: str = "eval",
    limit: int | None = 256,
    image_size: int | None = None,
    channels: int | None = None,
    endpoint: str | None = None,
) -> EditPairs:
    """The first `limit` pairs of an edit-pairs split (local or s3://), decoded like training does."""
    manifest = read_split_manifest(DataConfig(path=path, s3_endpoint=endpoint))
    if manifest.kind != "edit_pairs":
        raise ValueError(
            f"{path}: holds {manifest.kind} shards, not edit pairs (build a pipelines/*_edits.yaml)"
        )
    size = image_size or int((manifest.image_size or [0])[0]) or None
    if size is None:
        raise ValueError(f"{path}: images have mixed sizes; pass image_size")
    ch = channels or (1 if manifest.image_mode == "L" else 3)
    cfg = DataConfig(
        path=path, split=split, image_size=size, channels=ch, text_column="instruction", s3_endpoint=endpoint
    )
    parts: dict[str, list] = {"source": [], "target": [], "instructions": [], "labels": [], "ids": []}
    for b in iter_local_batches(cfg, split, limit=limit):
        parts["source"].append(torch.as_tensor(b["source_image"]).float())
        parts["target"].append(torch.as_tensor(b["image"]).float())
        parts["instructions"] += [str(t) for t in b["instruction"]]
        parts["labels"].append(torch.as_tensor(b["label"]).long())
        parts["ids"] += [str(i) for i in b["id"]]
    if not parts["ids"]:
        raise ValueError(f"{path}: split {split!r} has no usable edit pairs")
    return EditPairs(
        torch.cat(parts["source"]),
        torch.cat(parts["target"]),
        parts["instructions"],
        torch.cat(parts["labels"]),
        parts["ids"],
        _ops(path, manifest, split, parts["ids"], endpoint),
    )


def _ops(path: str, manifest: Any, split: str, ids: list[str], endpoint: str | None) -> list[str]:
    """The op of each pair, from the shards' optional `edit` column (JSON of the exact edit)."""
    if "edit" not in manifest.columns:
        return ["?"] * len(ids)
    wanted, found = set(ids), {}
    for _, table in iter_shard_tables(path, manifest.splits[split].shards, endpoint, columns=["id", "edit"]):
        for rid, spec in zip(table.column("id").to_pylist(), table.column("edit").to_pylist()):
            if rid in wanted and spec:
                found[rid] = json.loads(spec).get("op", "?")
        if len(found) == len(wanted):
            break
    return [found.get(i, "?") for i in ids]


@torch.no_grad()
def sample_edits(
    model: torch.nn.Module,
    pairs: EditPairs,
    settings: Any,
    *,
    encoder: Any,
    codec: Any = None,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Outputs (N, C, H, W) in [-1, 1]: each pair's source as `ref_image` (VAE-encoded for a latent
    model), its instruction as text, noise from (seed, position) so every setting sees the same noise."""
    device = torch.device(device)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    outs = []
    try:
        for unit in plan_units(len(pairs), batch_size, seed):
            rows = slice(unit.start, unit.stop)
            cond = {k: v.to(device) for k, v in encoder.encode(pairs.instructions[rows]).items()}
            ref = pairs.source[rows].to(device)
            cond["ref_image"] = (codec.encode(ref) if codec is not None else ref).to(dtype)
            outs.append(sample_unit(model, unit, cond, settings, device=device, codec=codec).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs)


def edit_metrics(outputs: Tensor, pairs: EditPairs, judge: Any = None, by_op: bool = False) -> dict[str, Any]:
    """`edit_mse`, `edit_psnr` (dB, capped at 100) against the exact targets; with a judge also
    `edit_class_kept` (output read as the target's class) and `edit_label_kept` (as the source label);
    `by_op`: also `{"by_op": {op: {pairs, edit_psnr, edit_class_kept}}}`."""
    out = outputs.float().clamp(-1, 1)
    mse, psnr = mse_psnr(out, pairs.target)
    psnr = psnr.clamp(max=PSNR_CAP)
    m: dict[str, Any] = {"edit_mse": float(mse.mean()), "edit_psnr": float(psnr.mean())}
    kept = None
    if judge is not None:
        kept = (judge.classify(out) == judge.classify(pairs.target)).float()
        m["edit_class_kept"] = float(kept.mean())
        known = pairs.labels >= 0
        if known.any():
            got = judge.classify(out[known])
            m["edit_label_kept"] = float((got == pairs.labels[known]).float().mean())
    if by_op:
        m["by_op"] = {}
        for op in sorted(set(pairs.ops)):
            rows = torch.tensor([o == op for o in pairs.ops])
            m["by_op"][op] = {"pairs": int(rows.sum()), "edit_psnr": float(psnr[rows].mean())}
            if kept is not None:
                m["by_op"][op]["edit_class_kept"] = float(kept[rows].mean())
    return m


def judge_floor(pairs: EditPairs, judge: Any) -> dict[str, float]:
    """What the exact targets score: how often the judge reads a target as its source's label."""
    known = pairs.labels >= 0
    if not known.any():
        return {}
    got = judge.classify(pairs.target)
    return {"edit_label_kept_floor": float((got[known] == pairs.labels[known]).float().mean())}


def edit_grid(
    pairs: EditPairs, outputs: Mapping[str, Tensor], path: str | Path, rows: int = 8, scale: int = 3
) -> Path:
    """One row per pair: reference | instruction | one output per setting | exact target."""
    n = min(rows, len(pairs))
    cols = [("reference", pairs.source[:n])] + [(k, v[:n]) for k, v in outputs.items()]
    cols.append(("target", pairs.target[:n]))
    h, w = pairs.source.shape[-2] * scale, pairs.source.shape[-1] * scale
    text_w, pad, head = 230, 4, 18
    width = w + text_w + (len(cols) - 1) * (w + pad) + pad
    canvas = Image.new("RGB", (width, head + n * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    xs = [0, *(w + text_w + i * (w + pad) for i in range(len(cols) - 1))]
    draw.text((w + 4, 3), "instruction", fill="black")
    for x, (name, _) in zip(xs, cols):
        draw.text((x + 2, 3), name, fill="black")
    tiles = [to_uint8(t) for _, t in cols]
    for r in range(n):
        y = head + r * (h + pad)
        for x, imgs in zip(xs, tiles):
            canvas.paste(to_pil(imgs[r]).convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        words, line, lines = pairs.instructions[r].split(), "", []
        for word in words:  # wrap at ~36 characters
            if line and len(line) + len(word) > 36:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for i, text in enumerate(lines[:4]):
            draw.text((w + 6, y + 4 + 12 * i), text, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ------------------------------------------------------------------------------------ twinflow eval
def is_edit_export(meta: Mapping[str, Any]) -> bool:
    return "edit" in (meta.get("tasks") or [])


def evaluate_editor(
    export: Any,
    pairs: EditPairs,
    nfe_list: Sequence[int],
    judge: Any,
    *,
    sampler: str = "auto",
    seed: int = 0,
    batch_size: int = 128,
    device: str = "cpu",
) -> tuple[dict[int, dict[str, float]], dict[int, Tensor]]:
    """({nfe: metrics}, {nfe: outputs}) for one `twinflow.export_reader.Export`."""
    model = export.generator().to(device)
    codec = export.codec()
    encoder = export.text_encoder(device)
    chosen = resolve_sampler(sampler, export.method)
    per_nfe, outputs = {}, {}
    for nfe in nfe_list:
        st = settings_for(SAMPLER_METHODS[chosen], nfe)
        t0 = time.perf_counter()
        out = sample_edits(
            model, pairs, st, encoder=encoder, codec=codec, seed=seed, batch_size=batch_size, device=device
        )
        per_nfe[nfe] = {
            **edit_metrics(out, pairs, judge, by_op=True),
            "sampler": chosen,
            "sample_s": time.perf_counter() - t0,
        }
        outputs[nfe] = out
    return per_nfe, outputs


def edit_scores(
    export: Any,
    path: str,
    nfe_list: Sequence[int],
    judge: Any,
    *,
    limit: int = 256,
    sampler: str = "auto",
    seed: int = 0,
    batch_size: int = 128,
    endpoint: str | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Flat `edit_<metric>_nfe<n>` plus the exact targets' `edit_label_kept_floor`: what `twinflow eval
    --edits` adds to a text-to-image checkpoint's report, from the same pairs, noise and metrics."""
    size, ch = int(export.meta["image_size"]), int(export.meta["pixel_channels"])
    pairs = load_edit_pairs(path, limit=limit, image_size=size, channels=ch, endpoint=endpoint)
    per_nfe, _ = evaluate_editor(
        export, pairs, nfe_list, judge, sampler=sampler, seed=seed, batch_size=batch_size, device=device
    )
    flat = {f"{k}_nfe{n}": v for n, m in per_nfe.items() for k, v in m.items() if k.startswith("edit_")}
    return {**flat, **(judge_floor(pairs, judge) if judge is not None else {})}


def run_edit_eval(
    checkpoints: Sequence[str],
    *,
    nfe: Sequence[int],
    edits: str | None = None,
    dataset: str | None = None,
    limit: int = 500,
    sampler: str = "auto",
    seed: int = 0,
    batch_size: int = 128,
    out_dir: str | Path = "outputs/eval",
    grid_rows: int = 8,
    endpoint: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score edit exports on held-out pairs: `results.json`, `results.md`, `grids/<name>_edits.png`.

    The pairs come from `edits`, else the `data.path` of each run's `job.json`; the judge from
    `dataset`, else the shards' source (MNIST edits -> the MNIST judge)."""
    nfe_list = check_nfe(nfe)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"kind": "edits", "nfe": nfe_list, "seed": seed, "checkpoints": []}
    grids = []
    for ck in checkpoints:
        uri, meta = find_export(ck, endpoint)
        if not is_edit_export(meta):
            raise EvalInputError(f"checkpoint {ck} is not an image editor (its tasks: {meta.get('tasks')})")
        data = edits or (job_data(uri, endpoint) or (None,))[0]
        if data is None:
            raise EvalInputError(f"cannot tell which edit pairs {ck} was trained on; pass --edits <shards>")
        ds = dataset or infer_dataset(uri, endpoint)
        judge = load_judge(ds) if ds else None
        size, ch = int(meta["image_size"]), int(meta["pixel_channels"])
        try:
            pairs = load_edit_pairs(data, limit=limit, image_size=size, channels=ch, endpoint=endpoint)
        except (FileNotFoundError, ValueError) as exc:
            raise EvalInputError(f"edit pairs {data}: {exc}") from None
        per_nfe, outputs = evaluate_editor(
            open_export(uri, endpoint),
            pairs,
            nfe_list,
            judge,
            sampler=sampler,
            seed=seed,
            batch_size=batch_size,
            device=device,
        )
        name = str(meta.get("job") or Path(uri).name)
        grid = edit_grid(
            pairs,
            {f"{n} NFE": o for n, o in outputs.items()},
            out_dir / "grids" / f"{name}_edits.png",
            rows=grid_rows,
        )
        grids.append(str(grid))
        report["checkpoints"].append(
            {
                "name": name,
                "uri": uri,
                "method": meta.get("method"),
                "edits": data,
                "dataset": ds,
                "pairs": len(pairs),
                "per_nfe": {str(n): m for n, m in per_nfe.items()},
                "floor": judge_floor(pairs, judge) if judge else {},
                "grid": str(grid),
            }
        )
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = edit_markdown(report)
    write_json_atomic(out_dir / "results.json", report, indent=2)
    (out_dir / "results.md").write_text(md + "\n")
    report["markdown"] = md
    report["files"] = {
        "json": str(out_dir / "results.json"),
        "markdown": str(out_dir / "results.md"),
        "grids": grids,
    }
    return report


def edit_markdown(report: Mapping[str, Any]) -> str:
    lines = [
        "| checkpoint | method | sampler | NFE | MSE | PSNR (dB) | judge reads the instructed class | "
        "reads the source label |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for ck in report["checkpoints"]:
        for n, m in ck["per_nfe"].items():
            lines.append(
                f"| {ck['name']} | {ck['method']} | {m['sampler']} | {n} | {m['edit_mse']:.4f} | "
                f"{m['edit_psnr']:.2f} | {pct(m.get('edit_class_kept'))} | {pct(m.get('edit_label_kept'))} |"
            )
        floor = ck["floor"].get("edit_label_kept_floor")
        if floor is not None:
            lines.append(
                f"| *exact targets* ({ck['pairs']} pairs) | - | - | - | 0 | {PSNR_CAP:.0f} (cap) | "
                f"100% | {floor:.1%} |"
            )
    ops = [(ck["name"], n, m["by_op"]) for ck in report["checkpoints"] for n, m in ck["per_nfe"].items()]
    names = sorted({op for *_, by in ops for op in by})
    if names:
        lines += ["", "Per edit op: PSNR (dB) / judge reads the instructed class", ""]
        lines.append(
            "| checkpoint | NFE | "
            + " | ".join(f"{op} ({ops[0][2].get(op, {}).get('pairs', 0)})" for op in names)
            + " |"
        )
        lines.append("|---|---|" + "---|" * len(names))
        for name, n, by in ops:
            cells = [
                f"{by[op]['edit_psnr']:.1f} / {pct(by[op].get('edit_class_kept'))}" if op in by else "-"
                for op in names
            ]
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sweeps
def tune_evaluator(model, *, job, evaluation, settings, device, codec) -> dict[str, float]:
    """`evaluation.evaluator: twinflow.eval.edits:tune_evaluator`: per evaluation setting
    `eval/edit_psnr_<setting>`, `eval/edit_mse_<setting>`, `eval/edit_class_kept_<setting>` on the job's
    own held-out edit pairs (`evaluation.split`, `evaluation.samples` of them)."""
    pairs = load_edit_pairs(
        job.data.path,
        split=evaluation.split,
        limit=int(evaluation.samples),
        image_size=job.data.image_size,
        channels=job.data.channels,
        endpoint=job.data.s3_endpoint,
    )
    src = (read_split_manifest(job.data).source or {}).get("type")
    judge = load_judge(SOURCE_TYPES[src]) if src in SOURCE_TYPES else None
    encoder = shared_text_encoder(job.model.text_max_length, spec=job.model.text_encoder_spec)
    out: dict[str, float] = {}
    for s in settings:
        imgs = sample_edits(
            model,
            pairs,
            settings_for(
                job.method.name, s.nfe, **s.sampler_overrides(), guidance=sample_guidance_of(job.method)
            ),
            encoder=encoder,
            codec=codec,
            seed=evaluation.seed,
            batch_size=evaluation.batch_size,
            device=device,
        )
        for k, v in edit_metrics(imgs, pairs, judge).items():
            out[f"eval/{k}_{s.suffix}"] = v
    return out


# ---------------------------------------------------------------------------------------------- CLI
def eval_command(args: Any) -> dict[str, Any] | None:
    """`twinflow eval` on editors: the edit report, or None when no checkpoint is an editor (then the
    text-to-image evaluation runs). Mixing editors and generators in one call is an error."""
    kinds = [is_edit_export(find_export(c, args.s3_endpoint)[1]) for c in args.checkpoints]
    if not any(kinds):
        return None
    if not all(kinds):
        raise EvalInputError("evaluate editors and text-to-image checkpoints in separate calls")
    return run_edit_eval(
        args.checkpoints,
        nfe=args.nfe,
        edits=args.edits,
        dataset=args.dataset,
        limit=args.edit_limit,
        sampler=args.sampler,
        seed=args.seed,
        batch_size=args.batch_size,
        out_dir=args.out,
        endpoint=args.s3_endpoint,
        device=args.device,
    )
