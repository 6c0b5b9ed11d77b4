"""Data pipeline throughput on this machine, next to what the tiny training config consumes.

    .venv/bin/python benchmarks/data_throughput.py [--records 10000] [--step-time-s 0.15] [--batch-size 32]

Measures, on a local Ray cluster over real Fashion-MNIST shards:
  * shard build rate (`twinflow data build`, PNG encode + parquet, single process);
  * Ray Data streaming rate (records/s, steady state after the first batch) for
    decode only / decode + text embed uncached (encoder on every row, LRU off) /
    decode + text embed uncached with the actor's caption LRU / decode + cached text states;
  * embedding-cache build rate;
  * data-wait: two consumer threads on `streaming_split(2)` (what `get_dataset_shard` gives two Ray
    Train workers) each take a step of --step-time-s per micro-batch; data-wait = time blocked
    waiting for the next batch / wall time, after the first batch (pipeline start-up is reported
    apart). Steps either sleep (the step runs on an accelerator, the host CPU is free) or burn CPU
    with torch on one thread (the step competes with the pipeline for this machine's cores).

Writes benchmarks/results/data_throughput.json and the `## Data pipeline throughput` section of
docs/benchmarks.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Data pipeline throughput"


def build_shards(out: Path) -> dict:
    from twinflow.data import build_pipeline, load_pipeline

    cfg = load_pipeline(REPO / "pipelines/fashion_mnist.yaml", [f"output={out}"])
    result = build_pipeline(cfg, progress=False)
    return {
        "records": result.manifest.total,
        "seconds": round(result.seconds, 2),
        "records_per_s": round(result.records_per_s),
    }


def drain(cfg, batch_size: int = 256) -> tuple[int, float, float]:
    """Build and drain the dataset once: (records, seconds to the first batch, total seconds)."""
    from twinflow.data.streaming import build_train_dataset, iter_torch_kwargs

    t0 = time.perf_counter()
    first, n = None, 0
    for batch in build_train_dataset(cfg).iter_torch_batches(batch_size=batch_size, **iter_torch_kwargs(cfg)):
        first = first or time.perf_counter()
        n += len(batch["id"])
    return n, first - t0, time.perf_counter() - t0


def stream_rate(cfg, small: int = 256) -> dict:
    """Marginal records/s: (N - n) / (T(N) - T(n)) for a full run and a tiny run of the same pipeline,
    so the start-up both pay (task launch, encoder actor loading) cancels; start-up is reported apart.
    (The time to the first batch alone would not do: a small run is fully buffered by then.)"""
    n_small, startup, t_small = drain(cfg.model_copy(update={"limit": small}))
    n, _, t = drain(cfg)
    return {
        "records": n,
        "startup_s": round(startup, 2),
        "total_s": round(t, 2),
        "records_per_s": round((n - n_small) / (t - t_small)) if t > t_small else None,
        "records_per_s_incl_startup": round(n / t),
    }


def cpu_step(seconds: float) -> None:
    import torch

    end = time.perf_counter() + seconds
    a = torch.randn(128, 128)
    while time.perf_counter() < end:
        a = torch.tanh(a @ a.T / 128)


def data_wait(cfg, workers: int, batch_size: int, step_s: float, mode: str) -> dict:
    """``workers`` threads consume ``streaming_split(workers)`` with a fixed step per micro-batch."""
    import torch

    from twinflow.data.streaming import build_train_dataset, iter_torch_kwargs

    torch.set_num_threads(1)
    splits = build_train_dataset(cfg).streaming_split(workers, equal=True)
    stats = [dict(wait=0.0, wall=0.0, steps=0, first=0.0) for _ in range(workers)]

    def worker(rank: int) -> None:
        it = iter(
            splits[rank].iter_torch_batches(batch_size=batch_size, drop_last=True, **iter_torch_kwargs(cfg))
        )
        s = stats[rank]
        t = time.perf_counter()
        if next(it, None) is None:
            return
        s["first"] = time.perf_counter() - t
        start = time.perf_counter()
        while True:
            (cpu_step if mode == "cpu" else time.sleep)(step_s)
            s["steps"] += 1
            t = time.perf_counter()
            batch = next(it, None)
            s["wait"] += time.perf_counter() - t
            if batch is None:
                break
        s["wall"] = time.perf_counter() - start

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait, wall = sum(s["wait"] for s in stats), sum(s["wall"] for s in stats)
    steps = sum(s["steps"] for s in stats)
    return {
        "mode": mode,
        "steps": steps,
        "data_wait_fraction": round(wait / wall, 4) if wall else None,
        "mean_wait_ms": round(1000 * wait / max(steps, 1), 2),
        "first_batch_s": round(max(s["first"] for s in stats), 2),
        "consumed_records_per_s": round(steps * batch_size / (wall / workers)) if wall else None,
    }


def write_docs(results: dict, path: Path) -> None:
    r = results
    req = r["consumer"]["required_records_per_s"]
    lines = [
        SECTION,
        "",
        f"Measured by `benchmarks/data_throughput.py` on {r['machine']} ({r['date']}; load average "
        f"{r.get('load_average', '?')} at the start, the machine was shared with other jobs); "
        f"Fashion-MNIST shards, 28x28 gray -> {r['image_size']}x{r['image_size']} float32, MiniLM text "
        f"encoder (384-d, max_length {r['text_max_length']}), local Ray cluster with {r['ray_num_cpus']} "
        f"logical CPUs, one text-encoder actor; {r['records']} records per run (decode only: the whole 60k "
        f"train split). Rates are marginal, (N - 256) / (T(N) - T(256)), so the start-up every run pays "
        f"(Ray task launch, encoder actor loading) cancels; it is listed apart. The 60k captions are 50 "
        f"distinct strings (10 classes x 5 templates), so the actor's caption LRU hits almost always; "
        f"'encoder on every row' switches it off and is the case of a big encoder over unique captions. "
        f"Raw numbers: `benchmarks/results/data_throughput.json`.",
        "",
        f"Shard build (`twinflow data build pipelines/fashion_mnist.yaml`, 70k records, one process): "
        f"**{r['build']['records_per_s']} records/s** ({r['build']['seconds']} s).",
        "",
        "| pipeline | records/s | start-up s |",
        "|---|---:|---:|",
    ]
    names = {
        "decode_only": "decode only (no text)",
        "embed_uncached_no_lru": "decode + text embed, uncached (encoder on every row)",
        "embed_uncached_lru": "decode + text embed, uncached, caption LRU in the actor",
        "embed_cached": "decode + cached text states",
    }
    for key, label in names.items():
        s = r["stream"][key]
        lines.append(f"| {label} | {s['records_per_s']} | {s['startup_s']} |")
    lines += [
        "",
        f"Embedding-cache build (`twinflow data embed`, {r['cache_build']['records']} records, caption "
        f"LRU on): {r['cache_build']['records_per_s']} records/s.",
        "",
        f"**Consumption of the tiny training config**: {r['consumer']['workers']} workers x micro-batch "
        f"{r['consumer']['batch_size']} per step of {r['consumer']['step_time_s']} s = **{req} records/s** "
        f"needed. Step time source: {r['consumer']['step_time_source']}.",
        "",
        "| text states | step | data-wait share of wall time | mean wait per step ms | first batch s |",
        "|---|---|---:|---:|---:|",
    ]
    labels = {
        "cached": "cached",
        "uncached_lru": "uncached, caption LRU",
        "uncached_no_lru": "uncached, encoder on every row",
    }
    for key, w in r["data_wait"].items():
        text = labels.get(key.split(" ")[0], key)
        lines.append(
            f"| {text} | {w['mode']} | {100 * w['data_wait_fraction']:.2f}% | {w['mean_wait_ms']} | "
            f"{w['first_batch_s']} |"
        )
    lines += [
        "",
        f"Data-wait: {r['consumer']['workers']} consumer threads on `streaming_split` (what "
        "`get_dataset_shard` gives Ray Train workers), `iter_torch_batches(**iter_torch_kwargs(cfg))` "
        f"with prefetch_batches={r['prefetch_batches']}; the first batch (start-up) is excluded and "
        "listed apart. Steps that `sleep` leave the CPU to the pipeline (as when the step runs on a "
        "GPU); `cpu` steps burn one core each with torch, so on this 2-core machine the consumers and "
        "the Ray Data tasks compete for the same cores. Target: data-wait under 2% of step time.",
        "",
    ]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = "\n".join(lines)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: block + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20000, help="records streamed per measurement")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--text-max-length", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="training workers (consumer threads)")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per worker per step")
    parser.add_argument(
        "--step-time-s",
        type=float,
        default=0.2,
        help="seconds per training step of the tiny config (default: an estimate, see below)",
    )
    parser.add_argument(
        "--step-time-source",
        default="estimate from docs/models.md (qwen_image/tiny-28g, B=32: 72 ms fwd+bwd + "
        "4.75 x 28 ms no-grad forwards per TwinFlow step, about 0.2 s per rank), "
        "not measured by this benchmark; rerun with --step-time-s once the tiny job's "
        "step time is measured",
    )
    parser.add_argument("--ray-num-cpus", type=int, default=4)
    parser.add_argument("--work-dir", help="where shards go (default: a temporary folder)")
    parser.add_argument("--docs", default=str(REPO / "docs/benchmarks.md"))
    parser.add_argument("--json", default=str(REPO / "benchmarks/results/data_throughput.json"))
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs section from --json")
    args = parser.parse_args(argv)
    if args.render_only:
        write_docs(json.loads(Path(args.json).read_text()), Path(args.docs))
        return 0
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())

    import logging

    import ray

    from twinflow.data import DataConfig

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="twinflow-bench-"))
    shards = work / "fashion_mnist"
    print("building shards ...", flush=True)
    build = build_shards(shards)
    print(f"  build: {build}", flush=True)
    ray.init(
        num_cpus=args.ray_num_cpus,
        include_dashboard=False,
        object_store_memory=512 * 1024**2,
        log_to_driver=False,
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    base = DataConfig(
        path=str(shards),
        split="train",
        image_size=args.image_size,
        channels=1,
        text_max_length=args.text_max_length,
        limit=args.records,
        embed_batch_size=256,
        decode_batch_size=256,
    )
    configs = {
        "decode_only": base.model_copy(update={"embed_text": False, "limit": None}),
        "embed_uncached_no_lru": base.model_copy(update={"embed_lru_size": 0}),
        "embed_uncached_lru": base,
        "embed_cached": base.model_copy(update={"embed_cache": True}),
    }
    from twinflow.data.embed_cache import build_embed_cache

    print("building the embedding cache ...", flush=True)
    t = time.perf_counter()
    cache = build_embed_cache(configs["embed_cached"].model_copy(update={"limit": None}), progress=False)
    cache_s = time.perf_counter() - t
    cache_build = {
        "records": cache.splits["train"].count,
        "seconds": round(cache_s, 2),
        "records_per_s": round(cache.splits["train"].count / cache_s),
    }
    print(f"  cache: {cache_build}", flush=True)
    stream = {}
    for key, cfg in configs.items():
        stream[key] = stream_rate(cfg)
        print(f"  stream {key}: {stream[key]}", flush=True)
    wait = {}
    for key, mode in (
        ("cached", "sleep"),
        ("uncached_lru", "sleep"),
        ("uncached_no_lru", "sleep"),
        ("cached", "cpu"),
    ):
        cfg = configs["embed_" + key] if key != "cached" else configs["embed_cached"]
        wait[f"{key} ({mode})"] = data_wait(cfg, args.workers, args.batch_size, args.step_time_s, mode)
        print(f"  data-wait {key} {mode}: {wait[f'{key} ({mode})']}", flush=True)
    ray.shutdown()
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "load_average": load,
        "records": args.records,
        "image_size": args.image_size,
        "text_max_length": args.text_max_length,
        "ray_num_cpus": args.ray_num_cpus,
        "prefetch_batches": base.prefetch_batches,
        "build": build,
        "cache_build": cache_build,
        "stream": stream,
        "data_wait": wait,
        "consumer": {
            "workers": args.workers,
            "batch_size": args.batch_size,
            "step_time_s": args.step_time_s,
            "step_time_source": args.step_time_source,
            "required_records_per_s": round(args.workers * args.batch_size / args.step_time_s),
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    write_docs(results, Path(args.docs))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
