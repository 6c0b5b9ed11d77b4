"""How the two feature spaces read known corruptions of real images (no generator involved).

1,000 real train images per dataset (a seeded draw across classes) scored by `metrics_from_samples`
against the held-out reference, as they are and blurred (box 3x3, 5x5), noised (Gaussian sigma 0.2,
0.4) and collapsed (every image replaced by its class mean): FD, diversity and adherence in the
judge's space beside FD and diversity in the autoencoder's. Shows what each space is blind to.

    .venv/bin/python benchmarks/feature_space_controls.py     # about a minute on one thread

Writes benchmarks/results/feature_space_controls.json and prints a markdown table per dataset.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "feature_space_controls.json"


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, 1)


def controls(dataset: str, n: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    from twinflow.eval.datasets import load_split
    from twinflow.eval.judges import load_judge
    from twinflow.eval.metrics import metrics_from_samples, real_reference

    judge = load_judge(dataset)
    ref = real_reference(judge)
    train = load_split(dataset, "train")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(train.labels), generator=gen)[:n].sort().values.numpy()
    x, y = train.as_float(idx), train.labels[idx]
    labels = torch.as_tensor(y)
    means = torch.stack([x[labels == c].mean(0) for c in range(judge.dataset.num_classes)])
    cases = {
        "real train images": x,
        "blurred 3x3": _blur(x, 3),
        "blurred 5x5": _blur(x, 5),
        "noised sigma 0.2": (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
        "noised sigma 0.4": (x + 0.4 * torch.randn(x.shape, generator=gen)).clamp(-1, 1),
        "class means (collapse)": means[labels],
    }
    keys = ("fd", "diversity", "adherence", "fd_ae", "diversity_ae")
    return {
        name: {k: float(m[k]) for k in keys}
        for name, m in ((name, metrics_from_samples(img, y, judge, ref)) for name, img in cases.items())
    }


def markdown(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| images | FD, judge | diversity, judge | adherence | FD, AE space | diversity, AE space |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['fd']:.2f} | {m['diversity']:.2f} | {m['adherence']:.1%} | {m['fd_ae']:.1f} | "
            f"{m['diversity_ae']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d"), "images": 1000, "seed": 0, "datasets": {}}
    for ds in ("mnist", "fashion_mnist"):
        out["datasets"][ds] = controls(ds)
        print(f"### {ds}\n\n{markdown(out['datasets'][ds])}\n", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    OUT.write_text(json.dumps(out, indent=2))
    print(f"wrote {OUT} ({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
