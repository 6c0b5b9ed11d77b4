"""Quality metrics in a judge's feature space, and the in-process evaluation of a generator (plain torch).

| metric | definition | good |
|---|---|---|
| `fd` | Fréchet distance between Gaussians fitted to judge features of the generated images and of the held-out real images of the prompted classes: `|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)` | low; compare with `fd_floor` |
| `fd_floor` | the same distance for as many *real training* images, class for class, as were generated: what a perfect generator would score with this sample size | |
| `adherence` | fraction of images the judge classifies as the prompted class | high; the judge's held-out accuracy is the ceiling |
| `diversity` | per class, mean pairwise feature distance among generated images over the same among held-out real images; averaged over classes | about 1; near 0 = mode collapse |
| `collapse` | fraction of classes whose diversity ratio is below `COLLAPSE_RATIO` (0.5) | 0 |
| `fd_ae`, `diversity_ae`, `collapse_ae` | the same three in a second, independent feature space: the bottleneck of a convolutional autoencoder trained without labels (`autoencoder_space.py`; MNIST and Fashion-MNIST) | as above |
| `edit_mse`, `edit_psnr` | per-image MSE of an edit's output against its exact target (images in [-1, 1]), PSNR = 10 log10(2^2 / MSE), averaged over images | low / high |
| `edit_class_kept` | fraction of edit outputs the judge puts in the same class as the exact target | high |

`evaluate_generator` samples an in-memory model at several NFE and returns these as flat
`{"eval/fd_nfe1": ..., "eval/adherence_nfe1": ..., "eval/diversity_nfe1": ..., "eval/fd_floor": ...}`
(training's periodic eval); `twinflow eval` computes the very same numbers from samples drawn on a Ray
Data actor pool (`twinflow.eval.job`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from twinflow.eval.autoencoder_space import SPACE, FeatureSpace, has_feature_space, load_feature_space
from twinflow.eval.datasets import load_split, reference_manifest, shard_split
from twinflow.eval.frechet import feature_stats, frechet_distance
from twinflow.eval.judges import Judge
from twinflow.eval.sampling import SAMPLER_METHODS, check_nfe, plan_units, sample_unit
from twinflow.export_reader import shared_text_encoder
from twinflow.method.sampler import SamplerSettings, settings_for
from twinflow.method.twinflow import SATURATION_LEVEL  # one threshold for training diagnostics and eval

COLLAPSE_RATIO = 0.5
MAX_PAIRWISE = 512  # rows per class used for mean pairwise distances (exact below this)


# ------------------------------------------------------------------------------------------ primitives


def adherence(logits: Tensor, classes: Tensor | Sequence[int]) -> float:
    """Fraction of rows whose arg-max class is the prompted class."""
    classes = torch.as_tensor(classes)
    if logits.shape[0] != classes.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits rows for {classes.shape[0]} classes")
    return float((logits.argmax(1) == classes).float().mean())


def mean_pairwise_distance(features: Tensor, max_rows: int = MAX_PAIRWISE) -> float:
    """Mean Euclidean distance over distinct pairs (the first `max_rows` rows)."""
    f = torch.as_tensor(features).double()[:max_rows]
    n = f.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(f, f)
    return float(d.sum() / (n * (n - 1)))


def per_class_spread(features: Tensor, classes: Tensor | Sequence[int]) -> dict[int, float]:
    classes = torch.as_tensor(classes)
    return {int(c): mean_pairwise_distance(features[classes == c]) for c in classes.unique().tolist()}


def diversity(
    features: Tensor, classes: Tensor | Sequence[int], real_spread: Mapping[int, float]
) -> dict[str, Any]:
    """Within-class spread of generated features relative to real data (see module doc)."""
    gen = per_class_spread(features, classes)
    ratios = {
        c: gen[c] / real_spread[c]
        for c in gen
        if c in real_spread and real_spread[c] > 0 and np.isfinite(gen[c])
    }
    if not ratios:
        return {"diversity": float("nan"), "collapse": float("nan"), "per_class": {}}
    values = np.array(list(ratios.values()))
    return {
        "diversity": float(values.mean()),
        "collapse": float((values < COLLAPSE_RATIO).mean()),
        "per_class": {int(c): float(v) for c, v in sorted(ratios.items())},
    }


def mse_psnr(output: Tensor, target: Tensor, data_range: float = 2.0) -> tuple[Tensor, Tensor]:
    """Per-image MSE and PSNR (dB) of images in a range of width `data_range` ([-1, 1] -> 2).
    A perfect image has PSNR +inf."""
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ")
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(data_range**2 / mse)
    return mse, psnr


# ------------------------------------------------------------------------------------ real reference


@dataclass
class RealReference:
    """Judge features of the held-out split (the Fréchet reference) and of the train split (the floor)."""

    dataset: str
    judge_fingerprint: str
    heldout_features: Tensor
    heldout_labels: Tensor
    train_features: Tensor
    train_labels: Tensor
    heldout_saturated: Tensor  # per held-out image: how many of its pixels are above SATURATION_LEVEL
    pixels_per_image: int
    _stats: dict[tuple[int, ...], tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    _spread: dict[int, float] = field(default_factory=dict, repr=False)
    # the second feature space and its own reference of the same real images (None: none ships)
    second: tuple[FeatureSpace, RealReference] | None = field(default=None, repr=False)

    def stats(self, classes: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Mean and covariance of the held-out features of `classes` (all when None)."""
        key = tuple(sorted(set(int(c) for c in classes))) if classes is not None else ()
        if key not in self._stats:
            mask = (
                torch.isin(self.heldout_labels, torch.tensor(key))
                if key
                else torch.ones_like(self.heldout_labels, dtype=torch.bool)
            )
            if int(mask.sum()) < 2:
                raise ValueError(
                    f"{self.dataset}: the held-out split has fewer than 2 images of classes {list(key)}"
                )
            self._stats[key] = feature_stats(self.heldout_features[mask])
        return self._stats[key]

    def spread(self, cls: int) -> float:
        if cls not in self._spread:
            self._spread[cls] = mean_pairwise_distance(self.heldout_features[self.heldout_labels == cls])
        return self._spread[cls]

    def spreads(self, classes: Sequence[int]) -> dict[int, float]:
        return {int(c): self.spread(int(c)) for c in set(int(c) for c in classes)}

    def real_sample(self, classes: Sequence[int] | Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Train-split features matching `classes` row for row (drawn without replacement per class
        when possible): a stand-in for a perfect generator with the same prompts."""
        classes = torch.as_tensor(classes)
        gen = torch.Generator().manual_seed(seed)
        out = torch.empty(len(classes), self.train_features.shape[1], dtype=self.train_features.dtype)
        for c in classes.unique().tolist():
            rows = (classes == c).nonzero().flatten()
            pool = (self.train_labels == c).nonzero().flatten()
            if len(pool) == 0:
                raise ValueError(f"{self.dataset}: no training images of class {c} for the floor")
            if len(pool) >= len(rows):
                pick = pool[torch.randperm(len(pool), generator=gen)[: len(rows)]]
            else:
                pick = pool[torch.randint(len(pool), (len(rows),), generator=gen)]
            out[rows] = self.train_features[pick]
        return out, classes

    def floor(self, classes: Sequence[int] | Tensor, seed: int = 0) -> dict[str, float]:
        """What real training images score, with the same class list (fd, diversity), and the share of
        saturated pixels in the real held-out images of those classes."""
        feats, cls = self.real_sample(classes, seed)
        out = {
            "fd": frechet_distance(*feature_stats(feats), *self.stats(cls.tolist())),
            "diversity": diversity(feats, cls, self.spreads(cls.tolist()))["diversity"],
            "saturation": self.saturation(sorted(set(cls.tolist()))),
        }
        if self.second is not None:  # the same train images (same draw), in the second space
            floor2 = self.second[1].floor(classes, seed)
            out.update({f"fd_{SPACE}": floor2["fd"], f"diversity_{SPACE}": floor2["diversity"]})
        return out

    def saturation(self, classes: Sequence[int] | None = None) -> float:
        """`saturation` of the held-out images (of `classes` when given), as `real_saturation` counts it."""
        mask = (
            torch.ones_like(self.heldout_labels, dtype=torch.bool)
            if classes is None
            else torch.isin(self.heldout_labels, torch.tensor(list(classes)))
        )
        count = self.heldout_saturated[mask].sum().to(torch.float32)
        return float(count / (int(mask.sum()) * self.pixels_per_image))


def saturation(images: Tensor, level: float = SATURATION_LEVEL) -> float:
    """Share of pixels above `level`."""
    return float((images.float() > level).float().mean())


def real_saturation(dataset: str, classes: Sequence[int] | None = None) -> float:
    """`saturation` of the real held-out images (of `classes` when given): the figure to compare with."""
    split = load_split(dataset, "heldout")
    idx = None if classes is None else np.flatnonzero(np.isin(split.labels, list(classes)))
    return saturation(split.as_float(idx))


_REFERENCES: dict[tuple[str, str, int, str], RealReference] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("TWINFLOW_EVAL_CACHE", Path.home() / ".cache" / "twinflow" / "eval"))


def real_reference(
    judge: Judge | FeatureSpace,
    data: str | None = None,
    endpoint: str | None = None,
    max_train: int = 20_000,
    use_disk: bool = True,
    second_space: bool = True,
) -> RealReference:
    """The held-out/train features of the judge's dataset: from the shards at `data` (their eval and
    train splits: `eval.datasets.shard_split`), which is what jobs pass, or, with `data=None`, from the
    offline source (judge building and benchmarks on the setup machine). Cached in memory per process
    and on disk under $TWINFLOW_EVAL_CACHE (default ~/.cache/twinflow/eval), keyed by the judge's
    weights hash and the shards' checksums, so a job pays for it once (a few seconds for
    Fashion-MNIST) and later calls are free. With `second_space` (and an autoencoder shipped for the
    dataset) the same images' features in the second space ride along as `ref.second`, so every metric
    computed from this reference also reports `fd_ae` / `diversity_ae`."""
    ref = _reference(judge, data, endpoint, max_train, use_disk)
    if not second_space:
        return replace(ref, second=None) if ref.second is not None else ref
    if ref.second is None and isinstance(judge, Judge) and has_feature_space(judge.name):
        space = load_feature_space(judge.name)
        ref.second = (space, _reference(space, data, endpoint, max_train, use_disk))
    return ref


def _reference(
    judge: Judge | FeatureSpace, data: str | None, endpoint: str | None, max_train: int, use_disk: bool
) -> RealReference:
    where = "source" if data is None else reference_manifest(data, endpoint).digest()[:16]
    key = (judge.name, judge.fingerprint, max_train, where)
    if key in _REFERENCES:
        return _REFERENCES[key]
    path = cache_dir() / f"reference-{judge.name}-{judge.fingerprint}-{max_train}-{where}.pt"
    if use_disk and judge.fingerprint != "unsaved" and path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            ref = RealReference(
                judge.name, judge.fingerprint, *(d[k] for k in _SAVED), int(d["pixels_per_image"])
            )
            _REFERENCES[key] = ref
            return ref
        except Exception:  # a corrupt, foreign or older cache file: recompute
            pass
    if data is None:
        held, train = load_split(judge.name, "heldout"), load_split(judge.name, "train")
    else:
        held, train = (
            shard_split(judge.name, "heldout", data, endpoint),
            shard_split(judge.name, "train", data, endpoint),
        )
    idx = np.arange(len(train.labels))
    if len(idx) > max_train:
        idx = np.sort(np.random.default_rng(0).permutation(len(idx))[:max_train])
    held_x = held.as_float()
    ref = RealReference(
        judge.name,
        judge.fingerprint,
        judge.features(held_x),
        torch.from_numpy(held.labels),
        judge.features(train.as_float(idx)),
        torch.from_numpy(train.labels[idx]),
        (held_x > SATURATION_LEVEL).flatten(1).sum(1),
        int(held_x[0].numel()),
    )
    if use_disk and judge.fingerprint != "unsaved":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(
                {**{k: getattr(ref, k) for k in _SAVED}, "pixels_per_image": ref.pixels_per_image}, tmp
            )
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: the in-memory cache still holds it
    _REFERENCES[key] = ref
    return ref


_SAVED = (
    "heldout_features",
    "heldout_labels",
    "train_features",
    "train_labels",
    "heldout_saturated",
)


# ----------------------------------------------------------------------------------- from samples


def metrics_from_samples(
    images: Tensor, classes: Sequence[int] | Tensor, judge: Judge, reference: RealReference | None = None
) -> dict[str, Any]:
    """All sample metrics for one (checkpoint, NFE): images (N, C, H, W) in [-1, 1], the class each
    was prompted with. Returns fd, adherence, diversity, collapse, n and per-class breakdowns."""
    classes = torch.as_tensor(classes, dtype=torch.long)
    if images.shape[0] != classes.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {classes.shape[0]} classes")
    if images.shape[0] < 2:
        raise ValueError("need at least 2 generated images for a Fréchet distance")
    ref = reference or real_reference(judge)
    logits, feats = judge.logits_and_features(images)
    if not torch.isfinite(feats).all():
        raise ValueError("non-finite judge features: the generated images contain NaN or inf")
    fd = frechet_distance(*feature_stats(feats), *ref.stats(classes.tolist()))
    div = diversity(feats, classes, ref.spreads(classes.tolist()))
    hits = logits.argmax(1) == classes
    per_class = {int(c): float(hits[classes == c].float().mean()) for c in classes.unique().tolist()}
    out = {
        "fd": fd,
        "adherence": float(hits.float().mean()),
        "diversity": div["diversity"],
        "saturation": saturation(images),
        "collapse": div["collapse"],
        "n": int(len(classes)),
        "per_class_adherence": per_class,
        "per_class_diversity": div["per_class"],
    }
    if ref.second is not None:
        out.update(second_space_metrics(images, classes, *ref.second))
    return out


def second_space_metrics(
    images: Tensor, classes: Tensor, space: FeatureSpace, ref: RealReference
) -> dict[str, Any]:
    """FD, diversity and collapse of the images in the autoencoder's space (`fd_ae`, ...)."""
    feats = space.features(images)
    if not torch.isfinite(feats).all():
        raise ValueError(f"non-finite {SPACE} features: the generated images contain NaN or inf")
    div = diversity(feats, classes, ref.spreads(classes.tolist()))
    return {
        f"fd_{SPACE}": frechet_distance(*feature_stats(feats), *ref.stats(classes.tolist())),
        f"diversity_{SPACE}": div["diversity"],
        f"collapse_{SPACE}": div["collapse"],
        f"per_class_diversity_{SPACE}": div["per_class"],
    }


def flat_metrics(
    per_label: Mapping[Any, Mapping[str, Any]],
    floor: Mapping[str, float] | None = None,
    prefix: str = "eval/",
) -> dict[str, float]:
    """{label: metrics} -> {"eval/fd_nfe1": ..., "eval/adherence_nfe1": ..., ...} (scalars only); an int
    label n stands for `nfe<n>`."""
    out: dict[str, float] = {}
    for label, m in per_label.items():
        name = f"nfe{label}" if isinstance(label, int) else str(label)
        for k in (
            "fd",
            "adherence",
            "diversity",
            "collapse",
            "saturation",
            "edit_mse",
            "edit_psnr",
            "edit_class_kept",
            f"fd_{SPACE}",
            f"diversity_{SPACE}",
            f"collapse_{SPACE}",
        ):
            if k in m:
                out[f"{prefix}{k}_{name}"] = float(m[k])
    for k, v in (floor or {}).items():
        out[f"{prefix}{k}_floor"] = float(v)
    return out


# --------------------------------------------------------------------------- in-process generator eval


def evaluate_generator(
    model: torch.nn.Module,
    prompts: Sequence[str] | Sequence[int],
    nfe_list: Sequence[int] | None,
    judge: Judge,
    *,
    reference: RealReference | None = None,
    cond: Mapping[str, Tensor] | None = None,
    text_encoder: Any = None,
    images_per_prompt: int = 16,
    sampler: str = "few",
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 128,
    codec: Any = None,
    prefix: str = "eval/",
    details: dict | None = None,
    guidance: float = 0.0,
    null_cond: Mapping[str, Tensor] | None = None,
    settings: Mapping[str, SamplerSettings] | None = None,
) -> dict[str, float]:
    """Sample `model` at each NFE and score the images with `judge`: the metrics of training's periodic eval.

    - `prompts`: strings (their class comes from `judge.dataset.class_of`) or class indices (then the
      prompts are the dataset's caption templates, as in training). Each gets `images_per_prompt` images.
    - `cond`: the prompts already encoded, `{"text_states": (P, L, D), "text_mask": (P, L)}` in prompt
      order (e.g. the training loop's `eval_cond`); else `text_encoder` (a `TextEncoder`, made here with
      the model's `text_max_length` when None) encodes them.
    - `sampler`: "few" (TwinFlow presets, r = 0) or "ode" (uniform Euler steps at r = t: a flow-matching
      base); see `twinflow.eval.sampling`.
    - Noise depends only on `seed` and the sample's position, and is the same at every NFE.
    - `codec`: the VAE of a latent-space model (`load_export_codec`), to decode before judging.
    - `guidance`: CFG w for a flow-matching base (its `sample_guidance`); needs `null_cond`, or the
      text encoder's empty caption when the prompts are encoded here.
    - `settings`: {label: SamplerSettings} sampled instead of `nfe_list` x `sampler` (tune's evaluation
      axes); the metrics are then named `eval/fd_<label>`, ...
    Under ZeRO-3 every rank must call this (the forwards gather parameters); the numbers are identical.
    Returns `{"eval/fd_nfe1", "eval/adherence_nfe1", "eval/diversity_nfe1", "eval/collapse_nfe1", ...,
    "eval/fd_floor", "eval/diversity_floor"}`, plus `eval/fd_ae_nfe1`, `eval/diversity_ae_nfe1`,
    `eval/collapse_ae_nfe1`, ..., `eval/fd_ae_floor`, `eval/diversity_ae_floor` when the reference
    carries the second feature space (MNIST, Fashion-MNIST); pass a dict as `details` to also get
    per-class numbers.
    """
    if settings is None:
        settings = {
            f"nfe{n}": settings_for(SAMPLER_METHODS[sampler], n, guidance=guidance)
            for n in check_nfe(nfe_list)
        }
    if not settings:
        raise ValueError("evaluate_generator needs at least one NFE or sampler setting")
    ds = judge.dataset
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_generator needs at least one prompt or class")
    if all(isinstance(p, (int, np.integer)) for p in prompts):
        classes = [int(p) for p in prompts]
        texts = [ds.prompt(c, i) for c in classes for i in range(images_per_prompt)]
        row_classes = [c for c in classes for _ in range(images_per_prompt)]
        prompt_index = None
        if cond is not None:
            raise ValueError("cond is only accepted with prompt strings, in the same order")
    else:
        texts_p = [str(p) for p in prompts]
        classes_p = ds.classes_of(texts_p)
        texts = [t for t in texts_p for _ in range(images_per_prompt)]
        row_classes = [c for c in classes_p for _ in range(images_per_prompt)]
        prompt_index = [i for i in range(len(texts_p)) for _ in range(images_per_prompt)]
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if cond is None:
        if text_encoder is None:
            text_encoder = shared_text_encoder(
                int(getattr(model, "text_max_length", 32)), spec=getattr(model, "text_encoder_spec", None)
            )
        encode = lambda rows: text_encoder.encode([texts[i] for i in rows])  # noqa: E731
    else:
        P = cond["text_states"].shape[0]
        if P != len(prompts):
            raise ValueError(f"cond holds {P} prompts, {len(prompts)} prompts given")
        encode = lambda rows: {k: v[[prompt_index[i] for i in rows]] for k, v in cond.items()}  # noqa: E731
    if any(st.guidance for st in settings.values()) and null_cond is None:
        if text_encoder is None:
            raise ValueError("guidance > 0 with pre-encoded cond needs null_cond")
        null_cond = text_encoder.null_condition()
    units = plan_units(len(texts), batch_size, seed)
    ref = reference or real_reference(judge)
    was_training = model.training
    model.eval()
    per_label: dict[str, dict[str, Any]] = {}
    try:
        for label, st in settings.items():
            imgs = []
            for unit in units:
                c = {k: v.to(device) for k, v in encode(list(range(unit.start, unit.stop))).items()}
                imgs.append(
                    sample_unit(model, unit, c, st, device=device, codec=codec, null_cond=null_cond).cpu()
                )
            per_label[label] = metrics_from_samples(torch.cat(imgs), row_classes, judge, ref)
    finally:
        model.train(was_training)
    floor = ref.floor(row_classes, seed=seed)
    if details is not None:
        details.update(
            {
                "per_setting": per_label,
                "floor": floor,
                "classes": sorted(set(row_classes)),
                "sampler": sampler,
            }
        )
    return flat_metrics(per_label, floor, prefix)


def digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:12]
