"""`twinflow eval`: checkpoints x NFE sampled as a Ray Data batch job on an actor pool, then judged.

    work units (checkpoint, NFE, rows [start, stop), seed)  --ray.data.from_items-->
    map_batches(SampleActor, compute=ActorPoolStrategy(size=actors), batch_size=1)   # actors cache models + MiniLM
    --> rows (checkpoint, NFE, index, image) --driver--> judge, metrics (twinflow.eval.metrics), report

Ray appears only here. A unit's images depend only on its seed, rows and NFE (not on which actor ran
it or how many there are), and the prompts/noise are the ones `evaluate_generator` uses with the same
settings, so the two agree exactly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import torch
from pydantic import Field, field_validator

from twinflow.config import StrictModel
from twinflow.eval.checkpoints import EvalInputError, find_export, infer_dataset, job_data
from twinflow.eval.datasets import canonical_name, get_dataset
from twinflow.eval.edits import edit_scores
from twinflow.eval.judges import load_judge
from twinflow.eval.metrics import metrics_from_samples, real_reference
from twinflow.eval.report import save_samples, write_reports
from twinflow.eval.sampling import (
    SAMPLER_METHODS,
    SampleUnit,
    check_nfe,
    plan_units,
    resolve_sampler,
    sample_unit,
)
from twinflow.export_reader import open_export
from twinflow.method.config import sample_guidance_of
from twinflow.method.sampler import settings_for


class EvalRequest(StrictModel):
    """Everything one `twinflow eval` run needs (the CLI flags, validated)."""

    checkpoints: list[str] = Field(..., min_length=1)
    dataset: str | None = Field(
        None, description="fashion_mnist | mnist | emoji; None = inferred per checkpoint"
    )
    nfe: list[int] = Field(default_factory=lambda: [1, 2, 4])
    sampler: Literal["auto", "few", "ode"] = "auto"
    samples_per_class: int = Field(100, ge=2, le=100_000)
    classes: list[int] | None = None
    actors: int = Field(1, ge=1, le=256)
    actor_cpus: float = Field(1.0, gt=0)
    batch_size: int = Field(100, ge=1)
    seed: int = 0
    out_dir: str = "outputs/eval"
    grid_per_class: int = Field(6, ge=0)
    s3_endpoint: str | None = None
    edits: str | None = Field(None, description="edit-pair shards (local or s3://) to score edits on")
    reference: str | None = Field(
        None, description="shards whose eval/train splits are the real images (default: each run's data.path)"
    )
    edit_limit: int = Field(256, ge=1)
    address: str | None = None
    device: str = "cpu"

    @field_validator("nfe", mode="before")
    @classmethod
    def _nfe(cls, v: Any) -> list[int]:
        return check_nfe(v)

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return [int(p) for p in v.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"classes must be comma-separated integers, got {v!r}") from None
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        return None if v is None else canonical_name(v)


# ------------------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointRef:
    uri: str  # the export folder (local absolute path or s3://...)
    name: str  # a short label: the job name, else the folder name
    meta: dict[str, Any]  # twinflow.json
    dataset: str
    sampler: str


def resolve_checkpoints(req: EvalRequest) -> list[CheckpointRef]:
    refs = []
    for path in req.checkpoints:
        uri, meta = find_export(path, req.s3_endpoint)
        ds = req.dataset or infer_dataset(uri, req.s3_endpoint)
        if ds is None:
            raise EvalInputError(
                f"cannot tell which dataset checkpoint {path} was trained on (no job.json with a "
                f"readable data.path next to it); pass --dataset fashion_mnist|mnist|emoji"
            )
        name = str(meta.get("job") or uri.rstrip("/").rsplit("/", 1)[-1])
        if name == "export":
            name = uri.rstrip("/").rsplit("/", 2)[-2]
        refs.append(CheckpointRef(uri, name, meta, ds, resolve_sampler(req.sampler, meta.get("method"))))
    names = [r.name for r in refs]
    for i, r in enumerate(refs):  # unique labels
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i}"
    return refs


def reference_shards(req: EvalRequest, ref: CheckpointRef) -> str:
    """The shards whose eval/train splits are a checkpoint's real images: --reference, else the shards
    its run was trained on (job.json's data.path); never a source folder found beside the code."""
    if req.reference:
        return req.reference
    found = job_data(ref.uri, req.s3_endpoint)
    if found is None:
        raise EvalInputError(
            f"cannot tell which shards checkpoint {ref.uri} was trained on (no job.json with a readable "
            "data.path next to it); pass --reference <shards with an eval and a train split>"
        )
    return found[0]


# ------------------------------------------------------------------------------------ sample plan


def sample_plan(dataset: str, classes: list[int] | None, per_class: int) -> tuple[list[str], list[int]]:
    """Flat (prompts, classes): `per_class` rows per class, class-major; prompts cycle the templates.
    `evaluate_generator(model, prompts, ..., images_per_prompt=1)` reproduces the same rows."""
    ds = get_dataset(dataset)
    classes = list(range(ds.num_classes)) if classes is None else classes
    bad = [c for c in classes if not 0 <= c < ds.num_classes]
    if bad:
        raise EvalInputError(f"classes {bad} out of range for {dataset} (0..{ds.num_classes - 1})")
    prompts = [ds.prompt(c, i) for c in classes for i in range(per_class)]
    return prompts, [c for c in classes for _ in range(per_class)]


class SampleActor:
    """Ray Data actor: opens each checkpoint once (`open_export`: s3:// exports download into the export
    cache) and samples work units."""

    def __init__(
        self,
        checkpoints: list[str],
        prompts: list[list[str]],
        samplers: list[str],
        device: str = "cpu",
        endpoint: str | None = None,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.checkpoints, self.prompts, self.samplers = checkpoints, prompts, samplers
        self.device, self.endpoint = device, endpoint
        self._models: dict[int, Any] = {}

    def _model(self, ck: int):
        if ck not in self._models:
            export = open_export(self.checkpoints[ck], self.endpoint)
            codec = export.codec()
            if len(self._models) >= 2:  # keep memory bounded when many checkpoints go through
                self._models.pop(next(iter(self._models)))
            self._models[ck] = (
                export.generator().to(self.device).eval(),
                codec.to(self.device) if codec else None,
                export,
            )
        return self._models[ck]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cks, nfes, idx, images = [], [], [], []
        for ck, nfe, start, stop, seed in zip(
            batch["ck"], batch["nfe"], batch["start"], batch["stop"], batch["seed"]
        ):
            ck, nfe, start, stop, seed = int(ck), int(nfe), int(start), int(stop), int(seed)
            model, codec, export = self._model(ck)
            encoder = export.text_encoder(self.device)
            cond = encoder.encode(self.prompts[ck][start:stop])
            cond = {k: v.to(self.device) for k, v in cond.items()}
            settings = settings_for(SAMPLER_METHODS[self.samplers[ck]], nfe, guidance=export.sample_guidance)
            out = sample_unit(
                model,
                SampleUnit(start, stop, seed),
                cond,
                settings,
                device=self.device,
                codec=codec,
                null_cond=encoder.null_condition() if settings.guidance else None,
            )
            images.append(out.cpu().numpy().astype(np.float32))
            n = stop - start
            cks.append(np.full(n, ck, dtype=np.int64))
            nfes.append(np.full(n, nfe, dtype=np.int64))
            idx.append(np.arange(start, stop, dtype=np.int64))
        return {
            "ck": np.concatenate(cks),
            "nfe": np.concatenate(nfes),
            "index": np.concatenate(idx),
            "image": np.concatenate(images),
        }


def _ensure_ray(address: str | None, actors: int, actor_cpus: float) -> None:
    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:  # oversubscribed logical CPUs so the read/scheduling tasks never starve beside the actors
        ray.init(
            num_cpus=max(4, int(np.ceil(actors * actor_cpus)) + 2),
            include_dashboard=False,
            object_store_memory=512 * 1024**2,
            runtime_env={"env_vars": env},
            log_to_driver=False,
            configure_logging=False,
        )


def sample_with_ray(
    req: EvalRequest, refs: list[CheckpointRef], prompts: list[list[str]]
) -> dict[tuple[int, int], np.ndarray]:
    """{(checkpoint index, NFE): images (N, C, H, W) float32 in [-1, 1], in plan order}."""
    _ensure_ray(req.address, req.actors, req.actor_cpus)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False  # quiet; restored below
    rows = [
        {"ck": ck, "nfe": nfe, "start": u.start, "stop": u.stop, "seed": u.seed}
        for ck in range(len(refs))
        for nfe in req.nfe
        for u in plan_units(len(prompts[ck]), req.batch_size, req.seed)
    ]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    out = ds.map_batches(
        SampleActor,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=req.actors),
        num_cpus=req.actor_cpus,
        fn_constructor_kwargs={
            "checkpoints": [r.uri for r in refs],
            "prompts": prompts,
            "samplers": [r.sampler for r in refs],
            "device": req.device,
            "endpoint": req.s3_endpoint,
            "threads": max(1, int(req.actor_cpus)),
        },
    )
    parts: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    try:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for key in set(zip(batch["ck"].tolist(), batch["nfe"].tolist())):
                m = (batch["ck"] == key[0]) & (batch["nfe"] == key[1])
                parts.setdefault(key, []).append((batch["index"][m], batch["image"][m]))
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved
    result = {}
    for key, chunks in parts.items():
        index = np.concatenate([c[0] for c in chunks])
        images = np.concatenate([c[1] for c in chunks])
        order = np.argsort(index, kind="stable")
        if not np.array_equal(index[order], np.arange(len(prompts[key[0]]))):
            raise RuntimeError(
                f"eval job returned rows {index[order][:5]}... for checkpoint {key[0]} NFE {key[1]}"
            )
        result[key] = images[order]
    return result


# --------------------------------------------------------------------------------------------- run


def run_eval(req: EvalRequest) -> dict[str, Any]:
    """Sample, judge, report. Returns the report dict (also written to `out_dir/results.json`)."""
    t0 = time.perf_counter()
    refs = resolve_checkpoints(req)
    for r in refs:  # the request's own mistakes (classes out of range) before any shards are looked up
        sample_plan(r.dataset, req.classes, 1)
    judges, references, floors, plans = {}, {}, {}, []
    for r in refs:
        if r.dataset not in judges:
            try:
                judges[r.dataset] = load_judge(r.dataset)
            except FileNotFoundError as exc:
                raise EvalInputError(str(exc)) from None
        judge = judges[r.dataset]
        shards = reference_shards(req, r)
        if (r.dataset, shards) not in references:
            try:
                references[r.dataset, shards] = real_reference(judge, shards, req.s3_endpoint)
            except (OSError, ValueError) as exc:
                raise EvalInputError(
                    f"real images of {r.dataset}: {exc}; pass --reference <shards>"
                ) from None
        c, h, w = (
            (int(v) for v in r.meta["sample_shape"])
            if not r.meta.get("latent")
            else (int(r.meta["pixel_channels"]), int(r.meta["image_size"]), int(r.meta["image_size"]))
        )
        if c not in (1, 3):
            raise EvalInputError(f"checkpoint {r.uri}: {c}-channel images cannot be judged")
        prompts, classes = sample_plan(r.dataset, req.classes, req.samples_per_class)
        plans.append((prompts, classes))
    images = sample_with_ray(req, refs, [p for p, _ in plans])
    t_sample = time.perf_counter() - t0

    out_dir = Path(req.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"request": req.model_dump(), "datasets": {}, "checkpoints": []}
    for ds, judge in judges.items():
        held = judge.meta.get("heldout", {})  # measured at training; tests/eval pins it on the real split
        report["datasets"][ds] = {
            "judge": {
                "weights": judge.meta.get("path"),
                "sha256": judge.meta.get("sha256", "")[:16],
                "heldout": held,
                "command": judge.meta.get("command"),
            }
        }
    for (ds, _), ref in references.items():
        if ref.second is not None and "feature_space" not in report["datasets"][ds]:
            space = ref.second[0]
            report["datasets"][ds]["feature_space"] = {
                "name": space.space,
                "weights": space.meta.get("path"),
                "sha256": space.meta.get("sha256", "")[:16],
                "heldout": space.meta.get("heldout", {}),
                "command": space.meta.get("command"),
            }
    for ck, r in enumerate(refs):
        prompts, classes = plans[ck]
        ref = references[r.dataset, reference_shards(req, r)]
        floor_key = (r.dataset, tuple(sorted(set(classes))), len(classes))
        if floor_key not in floors:
            floors[floor_key] = ref.floor(classes, seed=req.seed)
        entry = {
            "checkpoint": r.uri,
            "name": r.name,
            "dataset": r.dataset,
            "method": r.meta.get("method"),
            "lambda": (r.meta.get("method_config") or {}).get("lambda"),
            "steps": r.meta.get("steps"),
            "sampler": r.sampler,
            "guidance": sample_guidance_of(r.meta.get("method_config")),
            "floor": floors[floor_key],
            "nfe": {},
        }
        for nfe in req.nfe:
            x = torch.from_numpy(images[(ck, nfe)])
            m = metrics_from_samples(x, classes, judges[r.dataset], ref)
            entry["nfe"][str(nfe)] = m
            entry.setdefault("samples", {})[str(nfe)] = str(save_samples(out_dir, r.name, nfe, x, classes))
        report["checkpoints"].append(entry)
        report["datasets"][r.dataset]["floor"] = floors[floor_key]
    if req.edits:
        for entry, r in zip(report["checkpoints"], refs):
            entry["edits"] = _edit_scores(req, r, judges[r.dataset])
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["sampling_s"] = round(t_sample, 1)
    write_reports(report, out_dir, req.grid_per_class)
    return report


def _edit_scores(req: EvalRequest, ref: CheckpointRef, judge) -> dict[str, float]:
    """Edit pairs are few (hundreds): scored in-process on the driver, as `twinflow eval` scores editors."""
    try:
        return edit_scores(
            open_export(ref.uri, req.s3_endpoint),
            req.edits,
            req.nfe,
            judge,
            limit=req.edit_limit,
            sampler=ref.sampler,
            seed=req.seed,
            batch_size=req.batch_size,
            endpoint=req.s3_endpoint,
            device=req.device,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise EvalInputError(f"--edits {req.edits}: {exc}") from None
