"""Judges: small CNN classifiers trained by this project on real training splits (plain torch, no Ray).

A judge maps images in [-1, 1] to class logits and to a 128-d feature vector (the penultimate layer):
the logits judge prompt adherence, the features carry the Fréchet distance and the diversity.

    net: conv3x3(C->16) BN ReLU, maxpool -> conv3x3(16->32) BN ReLU, maxpool -> conv3x3(32->64) BN ReLU
         -> conv3x3(64->64) BN ReLU -> global average pool -> Linear(64, 128) ReLU  [features]
         -> Linear(128, classes)                                                     [logits]

Weights ship as `platform/twinflow/eval/weights/<dataset>.safetensors` (about 0.1-0.7 MB each), with
the training command, seed, epochs and the measured held-out accuracy in the safetensors metadata.
Reproduce one with `twinflow judges train <dataset>` (a few minutes on one CPU core).

The emoji "judge" is a feature extractor: it is trained to tell the train glyphs apart under
augmentation (shift, scale, blur, noise, colour jitter), one class per glyph; its features serve the
Fréchet distance and diversity, its logits adherence for prompts naming a train glyph.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from twinflow.eval.datasets import EvalDataset, canonical_name, get_dataset, load_split

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_DIM = 128
FORMAT = "twinflow-judge-v1"


class JudgeNet(nn.Module):
    def __init__(
        self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = FEATURE_DIM
    ) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features)."""
        feats = self.embed(self.body(x))
        return self.head(feats), feats


def prepare_images(images: Tensor, shape: tuple[int, int, int], who: str) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] of any size and 1 or 3 channels -> `shape` (C, H, W): grey from RGB
    by luma, RGB from grey by repetition, antialiased bilinear resizing; `who` names the network in errors."""
    if images.ndim != 4:
        raise ValueError(f"{who}: expected images (N, C, H, W), got shape {tuple(images.shape)}")
    x = images.float()
    c, h, w = shape
    if x.shape[1] != c:
        if x.shape[1] == 3 and c == 1:
            x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        elif x.shape[1] == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"{who}: cannot map {x.shape[1]} channels to {c}")
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


@dataclass
class Judge:
    """A trained judge for one dataset. `__call__`-free on purpose: use `logits_and_features`."""

    dataset: EvalDataset
    net: JudgeNet
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.dataset.image_shape

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("sha256", "unsaved"))[:12]

    def prepare(self, images: Tensor) -> Tensor:
        """Images (N, C, H, W) in [-1, 1] of any size and 1 or 3 channels -> the judge's input."""
        return prepare_images(images, self.input_shape, f"judge {self.name}")

    @torch.no_grad()
    def logits_and_features(self, images: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
        """(logits (N, K), features (N, 128)), float32 on the CPU; images in [-1, 1]."""
        self.net.eval()
        dev = next(self.net.parameters()).device
        logits, feats = [], []
        for i in range(0, images.shape[0], batch_size):
            lo, fe = self.net(self.prepare(images[i : i + batch_size]).to(dev))
            logits.append(lo.float().cpu())
            feats.append(fe.float().cpu())
        if not logits:
            return torch.zeros(0, self.dataset.num_classes), torch.zeros(0, FEATURE_DIM)
        return torch.cat(logits), torch.cat(feats)

    def classify(self, images: Tensor) -> Tensor:
        return self.logits_and_features(images)[0].argmax(1)

    def features(self, images: Tensor) -> Tensor:
        return self.logits_and_features(images)[1]

    def accuracy(self, images: Tensor, labels: Tensor | np.ndarray) -> float:
        pred = self.classify(images)
        return float((pred == torch.as_tensor(labels)).float().mean())


# ------------------------------------------------------------------------------------------- save / load


def weights_path(dataset: str) -> Path:
    return WEIGHTS_DIR / f"{canonical_name(dataset)}.safetensors"


def save_judge(net: JudgeNet, dataset: str, path: Path, meta: dict[str, Any]) -> Path:
    """Weights in float32, or float16 when `meta["store"] == "float16"` (the emoji judge's 1.36k-class
    head: 0.6 MB instead of 1.3 MB); loading always gives float32."""
    ds = get_dataset(dataset)
    store = torch.float16 if meta.get("store") == "float16" else torch.float32
    state = {
        k: (v.detach().cpu().to(store) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    info = {
        "format": FORMAT,
        "dataset": ds.name,
        "in_channels": ds.image_shape[0],
        "num_classes": ds.num_classes,
        "width": net.body[0].out_channels,
        "feature_dim": FEATURE_DIM,
        "image_shape": list(ds.image_shape),
        **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"twinflow_judge": json.dumps(info, sort_keys=True)})
    path.chmod(0o644)
    return path


def load_judge(dataset_or_path: str | Path, device: str | torch.device = "cpu") -> Judge:
    """The shipped judge for a dataset name (fashion_mnist, mnist, emoji), or a judge file's path."""
    return _load_judge(str(dataset_or_path), str(device))


@lru_cache(maxsize=8)
def _load_judge(key: str, device: str) -> Judge:
    path = Path(key) if key.endswith(".safetensors") else weights_path(key)
    if not path.is_file():
        name = path.stem
        raise FileNotFoundError(f"no judge weights at {path}; train them with `twinflow judges train {name}`")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("twinflow_judge")
    if raw is None:
        raise ValueError(f"{path}: not a twinflow judge (no 'twinflow_judge' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: judge format {meta.get('format')!r}, this code reads {FORMAT}")
    ds = get_dataset(meta["dataset"])
    if meta["num_classes"] != ds.num_classes:
        raise ValueError(f"{path}: {meta['num_classes']} classes, dataset {ds.name} has {ds.num_classes}")
    net = JudgeNet(meta["in_channels"], meta["num_classes"], meta["width"], meta["feature_dim"])
    missing, unexpected = net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}, strict=False
    )
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the judge net (missing {missing}, unexpected {unexpected})"
        )
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta["path"] = str(path)
    return Judge(ds, net.to(device).eval(), meta)


# ---------------------------------------------------------------------------------------------- training

# Per dataset: epochs, batch size, learning rate, width, augmentation.
RECIPES: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"epochs": 6, "batch_size": 128, "lr": 3e-3, "width": 16, "augment": "shift"},
    "mnist": {"epochs": 12, "batch_size": 128, "lr": 3e-3, "width": 16, "augment": "shift"},
    "emoji": {
        "epochs": 60,
        "batch_size": 128,
        "lr": 3e-3,
        "width": 24,
        "augment": "emoji",
        "store": "float16",
    },
}


def _shift(x: Tensor, gen: torch.Generator, max_px: int = 2) -> Tensor:
    """Random integer translation per image (pads with the image's own background, -1 for gray)."""
    n, _, h, w = x.shape
    pad = F.pad(x, (max_px,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_px)
    out = torch.gather(pad, 2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    return torch.gather(out, 3, cols)


def augment_emoji(x: Tensor, gen: torch.Generator) -> Tensor:
    """Views of a glyph: random scale (0.75-1.1) and shift, blur, colour jitter, noise (white background)."""
    n, c, h, w = x.shape
    scale = 0.75 + 0.35 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.3
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    # outside the glyph: white background (x+1 = 2 at white); zeros padding gave -1 (black): fill with 1
    inside = F.grid_sample(
        torch.ones(n, 1, h, w), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    out = out * inside + (1 - inside)
    blur = torch.rand(n, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None]) / 16
        out[blur] = F.conv2d(F.pad(out[blur], (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 3, 3), groups=c)
    gain = 1 + 0.2 * (torch.rand(n, c, 1, 1, generator=gen) - 0.5)
    out = (out + 1) * gain - 1
    out = out + 0.08 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(out.shape, generator=gen)
    return out.clamp(-1, 1)


def train_judge(
    dataset: str,
    *,
    out: Path | None = None,
    seed: int = 0,
    epochs: int | None = None,
    threads: int = 1,
    log=print,
) -> tuple[Path, dict[str, Any]]:
    """Train a judge on the dataset's `train` split, measure it on `heldout`, save it (see module doc)."""
    ds = get_dataset(dataset)
    recipe = dict(RECIPES[ds.name])
    if epochs is not None:
        recipe["epochs"] = epochs
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = load_split(ds.name, "train")
    held = load_split(ds.name, "heldout")
    x_train, y_train = train.as_float(), torch.from_numpy(train.labels)
    net = JudgeNet(ds.image_shape[0], ds.num_classes, recipe["width"])
    steps_per_epoch = math.ceil(len(y_train) / recipe["batch_size"])
    total = steps_per_epoch * recipe["epochs"]
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total, pct_start=0.15)
    t0 = time.perf_counter()
    for epoch in range(recipe["epochs"]):
        net.train()
        perm = torch.randperm(len(y_train), generator=gen)
        seen, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(perm), recipe["batch_size"]):
            idx = perm[i : i + recipe["batch_size"]]
            xb, yb = x_train[idx], y_train[idx]
            xb = augment_emoji(xb, gen) if recipe["augment"] == "emoji" else _shift(xb, gen)
            logits, _ = net(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
        log(
            f"[judge {ds.name}] epoch {epoch + 1}/{recipe['epochs']}: loss {loss_sum / seen:.4f}, "
            f"train acc {correct / seen:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
    net.eval()
    if recipe.get("store") == "float16":  # measure exactly what ships
        with torch.no_grad():
            for v in net.state_dict().values():
                if v.is_floating_point():
                    v.copy_(v.half().float())
    judge = Judge(ds, net, {})
    metrics = heldout_metrics(judge, seed=seed)
    log(f"[judge {ds.name}] held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    meta = {
        "seed": seed,
        **recipe,
        "train_images": int(len(y_train)),
        "train_split": train.description,
        "heldout_split": held.description,
        "heldout": metrics,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "command": f"twinflow judges train {ds.name}"
        + (f" --seed {seed}" if seed else "")
        + (f" --epochs {epochs}" if epochs is not None else ""),
        "torch": torch.__version__,
    }
    path = save_judge(net, ds.name, out or weights_path(ds.name), meta)
    _load_judge.cache_clear()
    return path, meta


def heldout_metrics(judge: Judge, seed: int = 0) -> dict[str, float]:
    """Classifiers: accuracy on the held-out split. Emoji: held-out glyphs are classes the judge never
    saw, so we measure its features: nearest-neighbour retrieval of one augmented view of each held-out
    glyph among another view of all held-out glyphs (`retrieval`), and train-glyph accuracy on augmented
    views (`accuracy`)."""
    held = load_split(judge.name, "heldout")
    if judge.name != "emoji":
        return {"accuracy": judge.accuracy(held.as_float(), held.labels)}
    gen = torch.Generator().manual_seed(10_000 + seed)
    x = held.as_float()
    fa = judge.features(augment_emoji(x, gen))
    fb = judge.features(augment_emoji(x, gen))
    d = torch.cdist(fa, fb)
    retrieval = float((d.argmin(1) == torch.arange(len(x))).float().mean())
    train = load_split(judge.name, "train")
    acc = judge.accuracy(augment_emoji(train.as_float(), gen), train.labels)
    return {"retrieval": retrieval, "accuracy": acc}
