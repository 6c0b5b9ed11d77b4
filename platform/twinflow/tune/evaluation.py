"""Evaluation-only axes: score a trained trial's export at every (NFE, style, rho) without retraining.

Evaluators (`evaluation.evaluator`):

- **twinflow.eval** (default): the project's judges (`twinflow.eval`, one small classifier per dataset
  with shipped weights), i.e. the same numbers as training's periodic eval and `twinflow eval`, at each
  setting: `eval/fd_<setting>` (Fréchet distance in judge features to the held-out real images of the
  prompted classes), `eval/adherence_<setting>` (share the judge puts in the prompted class),
  `eval/diversity_<setting>` (within-class spread relative to real images; near 0 = mode collapse),
  `eval/collapse_<setting>`, plus `eval/fd_floor` / `eval/diversity_floor` (real training images with
  the same class list: what a perfect generator scores at this sample size). On MNIST and
  Fashion-MNIST also the same FD and diversity in a second feature space independent of the judge (a
  convolutional autoencoder trained without labels, `twinflow.eval.autoencoder_space`):
  `eval/fd_ae_<setting>`, `eval/diversity_ae_<setting>`, `eval/collapse_ae_<setting>`,
  `eval/fd_ae_floor`, `eval/diversity_ae_floor`. Prompts are class-balanced: every class, its caption
  templates in turn. Needs data with a judge (Fashion-MNIST, MNIST, emoji).
- **builtin**: judge-free, for any data: `eval/pcafd_<setting>` (Fréchet distance in a pixel-PCA space
  fitted on `reference` real eval-split images, larger images area-downsampled to `feature_size` first),
  `eval/pcaadh_<setting>` (nearest-class-centroid adherence in that space, when the shards have labels),
  and their `_floor`s (held-out real images).
- **module:function**: `fn(model, *, job, evaluation, settings, device, codec) -> {"eval/...": float}`.

Every setting and every trial gets the same noise and the same captions (common random numbers), so
settings and trials differ only by the model and the sampler. The preset setting (few style, rho 1)
stands for the trial's own sampler (`twinflow.method.sampler.settings_for` its method: TwinFlow's
presets, a flow-matching base's ODE with its `sample_guidance`). The judged evaluator is
`twinflow.eval.metrics.evaluate_generator` itself, so its numbers are `twinflow eval`'s.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from twinflow.data.config import DataConfig
from twinflow.data.local import iter_local_batches
from twinflow.eval.frechet import frechet_distance_features
from twinflow.eval.judges import load_judge
from twinflow.eval.metrics import evaluate_generator, real_reference
from twinflow.eval.periodic import dataset_of, reference_of
from twinflow.export_reader import open_export, shared_text_encoder
from twinflow.imaging import save_grid
from twinflow.method.config import sample_guidance_of
from twinflow.method.sampler import SeedStream, sample_seeded, settings_for
from twinflow.train.config import JobConfig
from twinflow.tune.config import EvalSetting, EvaluationConfig


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """`twinflow.eval.metrics`' Fréchet distance between feature rows a (n, d) and b (m, d)."""
    return frechet_distance_features(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b)))


@dataclass
class Reference:
    """Real images of one split: the PCA basis, reference features, class centroids, held-out set."""

    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (k, D)
    ref_feats: np.ndarray  # (n_ref, k)
    centroids: np.ndarray | None  # (classes, k) or None without labels
    classes: np.ndarray | None
    held_images: np.ndarray  # (n_held, C, H, W) in [-1, 1]
    held_captions: list[str]
    held_labels: np.ndarray | None
    size: int  # images are area-downsampled to at most size x size first

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        images = shrink(images, self.size)
        flat = images.reshape(len(images), -1).astype(np.float64)
        return (flat - self.mean) @ self.basis.T

    def classify(self, feats: np.ndarray) -> np.ndarray:
        d = ((feats[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        return self.classes[d.argmin(1)]


def shrink(images: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """(N, C, H, W) -> area-downsampled to at most size x size (float32 numpy)."""
    x = torch.as_tensor(images).float()
    if max(x.shape[-2:]) > size:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(size, x.shape[-2]), min(size, x.shape[-1])))
    return x.numpy()


def _read_real(data_cfg, split: str, count: int, size: int) -> dict[str, Any]:
    cfg = data_cfg.model_copy(update={"split": split, "limit": None})
    images, captions, labels = [], [], []
    for batch in iter_local_batches(cfg, split, batch_size=min(count, 256), limit=count):
        images.append(shrink(batch["image"], size))
        texts = batch["instruction"] if cfg.is_edit else batch["caption"]
        captions += [str(t) for t in texts]
        labels.append(batch["label"] if "label" in batch else np.full(len(batch["id"]), -1))
    if not images:
        raise ValueError(f"{cfg.path}: split {split!r} has no readable images for the evaluation")
    return {
        "images": np.concatenate(images).astype(np.float32),
        "captions": captions,
        "labels": np.concatenate(labels).astype(np.int64),
    }


@lru_cache(maxsize=4)
def _reference_cached(
    data_json: str, split: str, n_ref: int, n_held: int, pca_dim: int, size: int
) -> Reference:
    data_cfg = DataConfig.model_validate_json(data_json)
    real = _read_real(data_cfg, split, n_ref + n_held, size)
    n = len(real["captions"])
    if n < 4:
        raise ValueError(f"{data_cfg.path}: only {n} images in split {split!r}; the evaluation needs more")
    if n < n_ref + n_held:  # a small split: half reference, half held out
        n_ref = max(2, min(n_ref, n // 2))
    ref, held = real["images"][:n_ref], real["images"][n_ref:]
    flat = ref.reshape(len(ref), -1).astype(np.float64)
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    k = max(1, min(pca_dim, len(ref) - 1, flat.shape[1]))
    basis = vt[:k]
    ref_feats = (flat - mean) @ basis.T
    labels = real["labels"]
    centroids = classes = None
    if (labels[:n_ref] >= 0).all() and len(np.unique(labels[:n_ref])) > 1:
        classes = np.unique(labels[:n_ref])
        centroids = np.stack([ref_feats[labels[:n_ref] == c].mean(0) for c in classes])
    held_labels = labels[n_ref:] if centroids is not None else None
    return Reference(
        mean, basis, ref_feats, centroids, classes, held, real["captions"][n_ref:], held_labels, size
    )


def reference_for(job, evaluation: EvaluationConfig) -> Reference:
    return _reference_cached(
        job.data.model_dump_json(),
        evaluation.split,
        evaluation.reference,
        evaluation.samples,
        evaluation.pca_dim,
        evaluation.feature_size,
    )


# ---- generation -------------------------------------------------------------------------------------
def _encoder(job):
    """The process's shared caption encoder (Ray reuses the evaluation task's worker from trial to trial)."""
    return shared_text_encoder(
        job.data.text_max_length, job.data.text_encoder_dir, spec=job.model.text_encoder_spec
    )


@torch.no_grad()
def generate(
    model,
    captions: list[str],
    setting: EvalSetting,
    *,
    job,
    seed: int,
    batch_size: int,
    device: torch.device,
    codec=None,
    encoder=None,
    shrink_to: int | None = None,
) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for `captions` (area-downsampled to `shrink_to` when given);
    noise depends on `seed` only (common random numbers)."""
    encoder = encoder or _encoder(job)
    settings = own_settings(job, setting)
    null = encoder.null_condition() if settings.guidance else None
    out = []
    stream = SeedStream(seed)  # the seed's noise row by row, whatever the batch size
    for i in range(0, len(captions), batch_size):
        cond = encoder.encode(captions[i : i + batch_size])
        x = sample_seeded(model, cond, settings, stream, null_cond=null)
        if codec is not None:
            x = codec.decode(x)
        out.append(
            x.float().clamp(-1, 1).cpu()
            if shrink_to is None
            else torch.from_numpy(shrink(x.cpu(), shrink_to))
        )
    return torch.cat(out)


def own_settings(job: JobConfig, setting: EvalSetting):
    """The sampler of an evaluation setting for a trial's model (`settings_for` its method and CFG)."""
    return settings_for(
        job.method.name, setting.nfe, **setting.sampler_overrides(), guidance=sample_guidance_of(job.method)
    )


def builtin(
    model, *, job, evaluation: EvaluationConfig, settings: list[EvalSetting], device: torch.device, codec=None
) -> dict[str, float]:
    ref = reference_for(job, evaluation)
    n = evaluation.samples
    captions = (
        [ref.held_captions[i % len(ref.held_captions)] for i in range(n)]
        if ref.held_captions
        else ["" for _ in range(n)]
    )
    labels = None
    if ref.held_labels is not None and len(ref.held_labels):
        labels = np.array([ref.held_labels[i % len(ref.held_labels)] for i in range(n)])
    out: dict[str, float] = {}
    if len(ref.held_images) >= 2:
        held_feats = ref.features(ref.held_images)
        out["eval/pcafd_floor"] = frechet_distance(ref.ref_feats, held_feats)
        if ref.held_labels is not None:
            out["eval/pcaadh_floor"] = float((ref.classify(held_feats) == ref.held_labels).mean())
    encoder = _encoder(job)
    for s in settings:
        images = generate(
            model,
            captions,
            s,
            job=job,
            seed=evaluation.seed,
            batch_size=evaluation.batch_size,
            device=device,
            codec=codec,
            encoder=encoder,
            shrink_to=evaluation.feature_size,
        ).numpy()
        feats = ref.features(images)
        fd = frechet_distance(ref.ref_feats, feats) if np.isfinite(feats).all() else math.inf
        out[f"eval/pcafd_{s.suffix}"] = fd
        if labels is not None:
            out[f"eval/pcaadh_{s.suffix}"] = float((ref.classify(feats) == labels).mean())
    return out


def judged(
    model, *, job, evaluation: EvaluationConfig, settings: list[EvalSetting], device: torch.device, codec=None
) -> dict[str, float]:
    """twinflow.eval's judge metrics at every eval setting: `evaluate_generator` with class-balanced
    prompts (every class, its caption templates in turn)."""
    name = dataset_of(job.data.path, job.data.s3_endpoint)
    if name is None:
        raise ValueError(
            f"{job.data.path}: no twinflow.eval judge fits this data (its judges cover Fashion-MNIST, "
            "MNIST and emoji shards); set evaluation.evaluator: builtin"
        )
    judge = load_judge(name)
    return evaluate_generator(
        model,
        list(range(judge.dataset.num_classes)),
        None,
        judge,
        reference=real_reference(judge, *reference_of(job)),
        text_encoder=_encoder(job),
        images_per_prompt=math.ceil(evaluation.samples / judge.dataset.num_classes),
        seed=evaluation.seed,
        device=device,
        batch_size=evaluation.batch_size,
        codec=codec,
        settings={s.suffix: own_settings(job, s) for s in settings},
    )


def resolve_evaluator(name: str) -> Callable[..., dict[str, float]]:
    if name == "builtin":
        return builtin
    if name == "twinflow.eval":
        return judged
    module, fn = name.split(":")
    return getattr(importlib.import_module(module), fn)


# ---- one trial --------------------------------------------------------------------------------------
def evaluate_export(
    export_dir: str, job_json: str, evaluation_json: str, grid_path: str | None = None
) -> dict[str, float]:
    """Load a trial's export, score every eval setting, and (optionally) write its sample grid:
    one row per setting, job.eval.prompts x evaluation.grid_images_per_prompt columns.
    Runs as a Ray task with one training worker's resources (the GPU, on a GPU cluster)."""
    job = JobConfig.model_validate_json(job_json)
    evaluation = EvaluationConfig.model_validate_json(evaluation_json)
    device = (
        torch.device("cuda") if job.cluster.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    )
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    export = open_export(export_dir)
    model = export.generator().to(device).eval()
    codec = export.codec()
    if codec is not None:
        codec = codec.to(device)
    settings = evaluation.settings()
    metrics = resolve_evaluator(evaluation.evaluator)(
        model, job=job, evaluation=evaluation, settings=settings, device=device, codec=codec
    )
    if grid_path and job.eval.prompts:
        captions = [p for p in job.eval.prompts for _ in range(evaluation.grid_images_per_prompt)]
        rows = [
            generate(
                model,
                captions,
                s,
                job=job,
                seed=evaluation.seed + 7,
                batch_size=evaluation.batch_size,
                device=device,
                codec=codec,
            )
            for s in settings
        ]
        save_grid(rows, [s.suffix.replace("_", " ") for s in settings], Path(grid_path))
    return metrics
