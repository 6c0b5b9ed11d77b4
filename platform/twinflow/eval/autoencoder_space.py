"""A second feature space for FD and diversity: a convolutional autoencoder's bottleneck.

The judges (`judges.py`) are classifiers: their features are what separates classes, so a generator
can score well in them while drawing images a classifier does not look at closely (texture, stroke
width, background). This space is independent of them in both architecture and objective:

    encoder: conv4x4/2 (C->32) SiLU -> conv4x4/2 (32->64) SiLU -> conv3x3/2 (64->64) SiLU
             -> flatten (64 x 4 x 4) -> Linear(1024, 64)                      [the 64-d features]
    decoder: Linear(64, 1024) SiLU -> convT3x3/2 (64->64) SiLU -> convT4x4/2 (64->32) SiLU
             -> convT4x4/2 (32->C) tanh                                         [reconstruction]

trained only to reconstruct the real training images (MSE, no labels: strided convolutions, no
BatchNorm, no pooling, no classifier head). Labels are used once, after training, for a held-out
figure: a linear probe on the frozen features.

Weights ship as `weights/ae_<dataset>.safetensors` (float16, about 0.5 MB) with the command, seed,
recipe and held-out figures in their metadata; `SHIPPED_SHA256` pins each shipped file's hash, and
loading a shipped file whose bytes differ is an error. Rebuild one with
`twinflow judges train-ae <dataset>` (a few minutes on one CPU thread; bit-identical on the same
machine and torch version).

A `FeatureSpace` quacks like a `Judge` where metrics need features (`name`, `fingerprint`,
`features`), so `metrics.real_reference` builds its real reference the same way.
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

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from twinflow.eval.datasets import EvalDataset, canonical_name, get_dataset, load_split
from twinflow.eval.frechet import frechet_distance_features
from twinflow.eval.judges import WEIGHTS_DIR, prepare_images

FORMAT = "twinflow-ae-features-v1"
FEATURE_DIM = 64
SPACE = "ae"  # metric suffix: fd_ae, diversity_ae, collapse_ae

# sha256 of the shipped weight files; a shipped file with other bytes is refused at load.
SHIPPED_SHA256: dict[str, str] = {
    "fashion_mnist": "7b6a07d1b37a061acf0d5657af5dc795fe0e8c763edf1bddd5c48993b991c5d6",
    "mnist": "cfd6b0fc8fe12afb720608b4b43d3e7b1cd41b1a7fe44b2a7c3f45c5d41da000",
}

# Per dataset: optimisation steps (batches of `batch_size`), peak lr. Fashion-MNIST's 60k images and
# MNIST's 9k get the same number of steps (about 5 and 36 epochs).
RECIPES: dict[str, dict[str, Any]] = {
    "fashion_mnist": {"steps": 2500, "batch_size": 128, "lr": 3e-3},
    "mnist": {"steps": 2500, "batch_size": 128, "lr": 3e-3},
}


class ConvAutoencoder(nn.Module):
    def __init__(self, channels: int = 1, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 4, stride=2, padding=1),  # 28 -> 14
            nn.SiLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),  # 14 -> 7
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),  # 7 -> 4
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(feature_dim, 64 * 4 * 4),
            nn.SiLU(),
            nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1),  # 4 -> 7
            nn.SiLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 7 -> 14
            nn.SiLU(),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),  # 14 -> 28
            nn.Tanh(),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, features)."""
        z = self.encoder(x)
        return self.decoder(z), z


@dataclass
class FeatureSpace:
    """The trained autoencoder of one dataset, used for its encoder's features."""

    dataset: EvalDataset
    net: ConvAutoencoder
    meta: dict[str, Any]

    space = SPACE

    @property
    def name(self) -> str:
        return self.dataset.name

    @property
    def fingerprint(self) -> str:
        return SPACE + str(self.meta.get("sha256", "unsaved"))[:12]

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """(N, 64) float32 on the CPU; images (N, C, H, W) in [-1, 1], any size, 1 or 3 channels."""
        self.net.eval()
        dev = next(self.net.parameters()).device
        out = [
            self.net.encoder(
                prepare_images(
                    images[i : i + batch_size], self.dataset.image_shape, f"{SPACE} {self.name}"
                ).to(dev)
            )
            .float()
            .cpu()
            for i in range(0, images.shape[0], batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        self.net.eval()
        x = prepare_images(images, self.dataset.image_shape, f"{SPACE} {self.name}")
        return self.net(x.to(next(self.net.parameters()).device))[0].float().cpu()


# ------------------------------------------------------------------------------------------- save / load


def weights_path(dataset: str) -> Path:
    return WEIGHTS_DIR / f"ae_{canonical_name(dataset)}.safetensors"


def has_feature_space(dataset: str) -> bool:
    """Whether a second feature space ships for this dataset (MNIST and Fashion-MNIST; emoji has none)."""
    try:
        return weights_path(dataset).is_file()
    except ValueError:
        return False


def load_feature_space(dataset_or_path: str | Path, device: str | torch.device = "cpu") -> FeatureSpace:
    """The shipped autoencoder of a dataset (hash-checked against `SHIPPED_SHA256`), or a weights file."""
    return _load(str(dataset_or_path), str(device))


@lru_cache(maxsize=8)
def _load(key: str, device: str) -> FeatureSpace:
    shipped = not key.endswith(".safetensors")
    path = weights_path(key) if shipped else Path(key)
    if not path.is_file():
        raise FileNotFoundError(
            f"no feature-space weights at {path}; train them with `twinflow judges train-ae {path.stem[3:]}`"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    name = canonical_name(key) if shipped else None
    if shipped and SHIPPED_SHA256.get(name) != digest:
        raise ValueError(
            f"{path}: sha256 {digest[:16]}... is not the shipped file's "
            f"({str(SHIPPED_SHA256.get(name))[:16]}...); restore it, or after `twinflow judges train-ae {name}` "
            "update SHIPPED_SHA256 in twinflow/eval/autoencoder_space.py"
        )
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("twinflow_features")
    if raw is None:
        raise ValueError(f"{path}: not a twinflow feature space (no 'twinflow_features' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, this code reads {FORMAT}")
    ds = get_dataset(meta["dataset"])
    net = ConvAutoencoder(int(meta["channels"]), int(meta["feature_dim"]))
    state = {k: v.float() for k, v in load_file(str(path)).items()}  # safetensors: tensors only, no pickle
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the autoencoder ({exc})") from None
    meta["sha256"] = digest
    meta["path"] = str(path)
    return FeatureSpace(ds, net.to(device).eval(), meta)


def save_feature_space(net: ConvAutoencoder, dataset: str, path: Path, meta: dict[str, Any]) -> Path:
    ds = get_dataset(dataset)
    state = {k: v.detach().cpu().half().contiguous() for k, v in net.state_dict().items()}
    info = {
        "format": FORMAT,
        "dataset": ds.name,
        "channels": ds.image_shape[0],
        "feature_dim": net.encoder[-1].out_features,
        "image_shape": list(ds.image_shape),
        "store": "float16",
        **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"twinflow_features": json.dumps(info, sort_keys=True)})
    path.chmod(0o644)
    return path


# ---------------------------------------------------------------------------------------------- training


def train_feature_space(
    dataset: str,
    *,
    out: Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    threads: int = 1,
    log=print,
) -> tuple[Path, dict[str, Any]]:
    """Train the autoencoder on the dataset's `train` split (images only), measure it on `heldout`,
    save it. Deterministic for a seed on one thread."""
    ds = get_dataset(dataset)
    if ds.name not in RECIPES:
        raise ValueError(f"no feature-space recipe for dataset {ds.name!r}; known: {sorted(RECIPES)}")
    recipe = dict(RECIPES[ds.name])
    if steps is not None:
        recipe["steps"] = int(steps)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = load_split(ds.name, "train")
    x_train = train.as_float()
    net = ConvAutoencoder(ds.image_shape[0])
    opt = torch.optim.AdamW(net.parameters(), lr=recipe["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=recipe["steps"], pct_start=0.1
    )
    bs = recipe["batch_size"]
    t0 = time.perf_counter()
    perm, pos, loss_sum = torch.randperm(len(x_train), generator=gen), 0, 0.0
    net.train()
    for step in range(recipe["steps"]):
        if pos + bs > len(perm):
            perm, pos = torch.randperm(len(x_train), generator=gen), 0
        xb = x_train[perm[pos : pos + bs]]
        pos += bs
        loss = F.mse_loss(net(xb)[0], xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += float(loss.detach())
        if (step + 1) % 100 == 0 or step + 1 == recipe["steps"]:
            log(
                f"[ae {ds.name}] step {step + 1}/{recipe['steps']}: mse {loss_sum / 100:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
            loss_sum = 0.0
    net.eval()
    with torch.no_grad():  # measure exactly what ships (float16 weights)
        for v in net.state_dict().values():
            v.copy_(v.half().float())
    space = FeatureSpace(ds, net, {})
    metrics = heldout_metrics(space, seed=seed)
    log(f"[ae {ds.name}] held-out: {json.dumps(metrics)}")
    meta = {
        "seed": seed,
        **recipe,
        "objective": "reconstruction MSE on the train split's images (no labels)",
        "train_images": int(len(x_train)),
        "train_split": train.description,
        "heldout_split": load_split(ds.name, "heldout").description,
        "heldout": metrics,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "command": f"twinflow judges train-ae {ds.name}"
        + (f" --seed {seed}" if seed else "")
        + (f" --steps {steps}" if steps is not None else ""),
        "torch": torch.__version__,
    }
    path = save_feature_space(net, ds.name, out or weights_path(ds.name), meta)
    _load.cache_clear()
    return path, meta


# --------------------------------------------------------------------------------------- held-out figures

NOISE_LEVELS = (0.1, 0.2, 0.4)  # std of Gaussian noise added to held-out images ([-1, 1]) for fd_noised


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: int, steps: int = 100
) -> float:
    """Accuracy of a multinomial logistic regression (L-BFGS on standardised features) fitted on the
    train features: how much class information the unsupervised features carry."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    lin = nn.Linear(a.shape[1], classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    a, b, ya = a.double(), b.double(), torch.as_tensor(train_y)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), ya) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(1) == torch.as_tensor(test_y)).float().mean())


def heldout_metrics(space: FeatureSpace, seed: int = 0) -> dict[str, Any]:
    """What the shipped file records and `tests/eval/test_autoencoder_space.py` re-measures:
    reconstruction MSE / PSNR on held-out images, linear-probe accuracy on held-out labels, FD between
    as many train as held-out images (real vs real: this sample size's floor), and the same FD with the
    held-out images noised at `NOISE_LEVELS` (growing with the noise)."""

    held, train = load_split(space.name, "heldout"), load_split(space.name, "train")
    xh = held.as_float()
    rec = space.reconstruct(xh)
    mse = float((rec - xh).pow(2).mean())
    fh = space.features(xh)
    gen = torch.Generator().manual_seed(20_000 + seed)
    idx = torch.randperm(len(train.labels), generator=gen)[: len(held.labels)].sort().values.numpy()
    ft = space.features(train.as_float(idx))
    probe = linear_probe(ft, torch.from_numpy(train.labels[idx]), fh, torch.from_numpy(held.labels), 10)
    noised = {}
    for s in NOISE_LEVELS:
        xn = (xh + s * torch.randn(xh.shape, generator=gen)).clamp(-1, 1)
        noised[str(s)] = frechet_distance_features(ft, space.features(xn))
    return {
        "recon_mse": mse,
        "recon_psnr": 10 * math.log10(4 / mse),
        "linear_probe_accuracy": probe,
        "fd_train_vs_heldout": frechet_distance_features(ft, fh),
        "fd_noised": noised,
    }
