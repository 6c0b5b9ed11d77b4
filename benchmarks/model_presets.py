"""Measure forward+backward time and parameter count of every preset on this CPU.

    .venv/bin/python benchmarks/model_presets.py --threads 1 --batch 32

Timings are medians over a few repeats after warm-up; they go into docs/models.md, never into tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def measure(family: str, preset: str, batch: int, repeats: int, patch: int | None = None) -> dict[str, float]:
    from twinflow.models.config import ModelConfig
    from twinflow.models.generator import build_generator

    torch.manual_seed(0)
    gen = build_generator(ModelConfig(family=family, preset=preset, patch=patch))
    c, h, w = gen.sample_shape
    x = torch.randn(batch, c, h, w)
    t, r = torch.rand(batch), torch.rand(batch) * 0.5
    cond = {
        "text_states": torch.randn(batch, gen.text_max_length, gen.text_dim),
        "text_mask": torch.ones(batch, gen.text_max_length, dtype=torch.int64),
    }
    cond["text_mask"][:, 10:] = 0
    params = sum(p.numel() for p in gen.parameters())

    def step() -> None:
        gen.zero_grad(set_to_none=True)
        gen(x, t, r, cond).square().mean().backward()

    def fwd() -> None:
        with torch.no_grad():
            gen(x, t, r, cond)

    out = {"params": params}
    for name, fn in (("fwd_bwd_ms", step), ("fwd_nograd_ms", fwd)):
        for _ in range(2):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    from twinflow.models.presets import PRESETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--family", action="append")
    ap.add_argument("--preset", action="append")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={args.threads}, batch={args.batch}")
    print(f"{'family':<11} {'preset':<12} {'params':>10} {'fwd+bwd ms':>11} {'fwd ms':>8}")
    for family in args.family or sorted(PRESETS):
        for preset in args.preset or sorted(PRESETS[family]):
            m = measure(family, preset, args.batch, args.repeats)
            print(
                f"{family:<11} {preset:<12} {m['params']:>10,} {m['fwd_bwd_ms']:>11.1f} {m['fwd_nograd_ms']:>8.1f}"
            )


if __name__ == "__main__":
    main()
