"""Serving latency, Serve overhead and batching throughput of the TwinFlow app (issue 6's benchmark).

Starts a local Ray cluster and Serve on a free 127.0.0.1 port (nothing else is contacted) with two
copies of the app on the same checkpoint: `/b` batches (compute turns of up to 16 images) and `/u`
does not (max_batch_images 1). Request counts are fixed and small.

- latency: one client, sequential requests (fresh seed each, one prompt) at 1, 2, 4 and 50 NFE, p50/p95
  over HTTP (png responses; base64-json too at 1 NFE) for both apps, and the same work in process
  (`engine.run_items`: cached text states, sampling, PNG encoding) on the same model, in alternating
  blocks of 5 requests: the Serve overhead is the p50 difference. At 1 NFE an empty deployment on
  the same proxy (`echo_app`) gives Serve's own floor on this machine;
- throughput: C concurrent closed-loop clients (aiohttp, one thread) for C = 1, 4, 16, with and
  without batching, at 1, 4 and 50 NFE; requests/s over the whole run. `--repeats N` runs u, b, u, b,
  ... back to back and reports the median of the N ratios;
- where the replica's time goes per request (`/v1/stats` phases, twinflow.serve.phases: parse, queue
  wait, handoff, batch assembly, model, encoding, response) for every throughput run;
- CPU time per request of the Serve processes (proxy, replica; from /proc), which unlike wall time
  does not depend on what else runs on a shared machine.

    nice -n 5 .venv/bin/python benchmarks/serve_bench.py      # -> benchmarks/results/serve_bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

from twinflow.serve.phases import per_request

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_bench.json"
PROMPT = "a photo of a sneaker"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


_TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_ms(pid: int) -> float:
    """user + system CPU time of one process (all its threads), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_MS


def serve_processes(apps: tuple[str, ...]) -> dict[str, int]:
    """PIDs of this run's Serve processes (descendants of this process, found by their Ray titles, which
    gain a '.method' suffix while busy): 'proxy' and '<app>/replica' per app."""
    me, found = os.getpid(), {}
    prefixes = {"ray::ProxyActor": "proxy"}
    for app in apps:
        prefixes[f"ray::ServeReplica:{app}:{'Echo' if app == 'echo' else 'TwinFlow'}"] = f"{app}/replica"
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        name = next((n for pre, n in prefixes.items() if title == pre or title.startswith(pre + ".")), None)
        if name is None:
            continue
        pid, hops = int(d.name), 0
        while pid > 1 and pid != me and hops < 10:
            pid, hops = _ppid(pid), hops + 1
        if pid == me:
            found[name] = int(d.name)
    return found


class CpuMeter:
    """CPU ms per request spent by the Serve processes on one app's requests (load-independent, unlike
    wall time on a shared machine)."""

    def __init__(self, pids: dict[str, int], app: str) -> None:
        self.pids = {k: v for k, v in pids.items() if k == "proxy" or k.startswith(app + "/")}
        self.start = {k: _cpu_ms(v) for k, v in self.pids.items()}

    def per_request(self, n: int) -> dict[str, float]:
        out = {k.split("/")[-1]: round((_cpu_ms(v) - self.start[k]) / n, 3) for k, v in self.pids.items()}
        out["total"] = round(sum(out.values()), 3)
        return out


def echo_app():
    """Serve's floor: an empty deployment on the same proxy that parses the JSON body and returns a fixed
    100-byte body (no FastAPI routing, no validation, no model)."""
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(name="Echo", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
    class Echo:
        async def __call__(self, request):
            await request.json()
            return Response(b"\0" * 100, media_type="image/png")

    return Echo.bind()


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def _pairs(rows: dict[str, list]) -> dict[str, list[tuple[dict, dict]]]:
    """{clients: [(unbatched run, batched run), ...]}, each pair measured back to back."""
    out: dict[str, list] = {}
    for ru, rb in zip(rows["u"], rows["b"]):
        out.setdefault(str(ru["clients"]), []).append((ru, rb))
    return out


def _mean_phases(runs: list[dict]) -> dict[str, float]:
    """Per-request replica phases (twinflow.serve.phases), averaged over repeated runs."""
    keys = runs[0]["replica_phases_ms"].keys()
    return {k: round(statistics.fmean(r["replica_phases_ms"][k] for r in runs), 3) for k in keys}


def _summary(ms: list[float]) -> dict:
    return {
        "n": len(ms),
        "p50_ms": round(_pct(ms, 0.5), 2),
        "p95_ms": round(_pct(ms, 0.95), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


class InProcess:
    """The same model and engine in this process: what a request costs without Serve and HTTP."""

    def __init__(self, export: str) -> None:
        import torch

        from twinflow.serve.engine import TextEncoders, load_served_model

        torch.set_num_threads(1)
        self.models = {"m": load_served_model("m", export, max_rows=16)}
        self.enc = TextEncoders(4096)

        self.cpu_ms: list[float] = []

    def timed(self, nfe: int, seed: int) -> float:
        from twinflow.serve.engine import Item, run_items

        c0, t0 = time.process_time(), time.perf_counter()
        run_items(self.models, self.enc, [Item("m", PROMPT, nfe, seed)])
        ms = (time.perf_counter() - t0) * 1e3
        self.cpu_ms.append((time.process_time() - c0) * 1e3)
        return ms


async def _post_timed(session, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with session.post(url, json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return (time.perf_counter() - t0) * 1e3


async def _latency(
    session, base: str, local: InProcess, nfe: int, n: int, warmup: int, block: int = 5
) -> dict:
    """In-process, unbatched app and batched app in alternating blocks of `block` requests, so a change
    in the machine's load hits all three alike."""
    ms: dict[str, list[float]] = {"in_process": [], "echo": [], "u": [], "b": [], "u_json": [], "b_json": []}
    for s in range(warmup):
        local.timed(nfe, 900_000 + s)
        for app in ("u", "b"):
            await _post_timed(
                session,
                f"{base}/{app}/v1/generate",
                {"prompt": PROMPT, "nfe": nfe, "seed": s, "format": "png"},
            )
    local.cpu_ms.clear()
    pids = serve_processes(("u", "b", "echo"))
    apps = ("echo", "u", "b") if nfe == 1 else ("u", "b")
    cpu_sum: dict[str, dict[str, float]] = {app: {} for app in apps}
    for lo in range(0, n, block):
        seeds = range(lo, min(n, lo + block))
        ms["in_process"] += [local.timed(nfe, s) for s in seeds]
        for app in apps:
            for fmt, key in (("png", app), ("base64-json", app + "_json")):
                if fmt == "base64-json" and (nfe != 1 or app == "echo"):
                    continue
                meter = CpuMeter(pids, app) if fmt == "png" else None
                for s in seeds:
                    ms[key].append(
                        await _post_timed(
                            session,
                            f"{base}/{app}/v1/generate",
                            {"prompt": PROMPT, "nfe": nfe, "seed": s, "format": fmt},
                        )
                    )
                if meter is not None:
                    for k, v in meter.per_request(1).items():
                        cpu_sum[app][k] = cpu_sum[app].get(k, 0.0) + v
    out = {k: _summary(v) for k, v in ms.items() if v}
    out["cpu_ms_per_request"] = {
        "in_process": round(statistics.fmean(local.cpu_ms), 3),
        **{app: {k: round(v / n, 3) for k, v in d.items()} for app, d in cpu_sum.items()},
    }
    return out


async def _phases(session, url: str) -> dict:
    async with session.get(url.replace("/v1/generate", "/v1/stats")) as r:
        return (await r.json())["phases"]


async def _closed_loop(
    session, url: str, nfe: int, clients: int, per_client: int, pids: dict[str, int], app: str
) -> dict:
    lat: list[float] = []

    async def client(c: int) -> None:
        for i in range(per_client):
            lat.append(
                await _post_timed(
                    session, url, {"prompt": PROMPT, "nfe": nfe, "seed": c * 10_000 + i, "format": "png"}
                )
            )

    await asyncio.gather(*(client(c) for c in range(min(clients, 2))))  # warm-up
    lat.clear()
    before = await _phases(session, url)
    meter = CpuMeter(pids, app)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    n = clients * per_client
    cpu = meter.per_request(n)
    phases = per_request(before, await _phases(session, url))
    return {
        "clients": clients,
        "requests": n,
        "wall_s": round(wall, 3),
        "req_per_s": round(n / wall, 1),
        **_summary(lat),
        "cpu_ms_per_request": cpu,
        "replica_phases_ms": phases,
        # what the replica could sustain with a whole core to itself
        "replica_cap_req_per_s": round(1000.0 / cpu["replica"], 1) if cpu.get("replica") else None,
    }


async def measure(base: str, local: InProcess, args) -> dict:
    import aiohttp

    out: dict = {"latency": {}, "throughput": {}}
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as session:
        for nfe in args.nfe:
            out["latency"][str(nfe)] = await _latency(
                session, base, local, nfe, args.counts[nfe], args.warmup
            )
            print(f"latency {nfe} NFE:", json.dumps(out["latency"][str(nfe)]), flush=True)
        pids = serve_processes(("u", "b"))
        out["serve_processes"] = sorted(pids)
        for nfe in args.throughput_nfe:
            rows: dict[str, list] = {"u": [], "b": []}
            for c in args.clients:
                total = args.throughput_requests if nfe < 50 else args.throughput_requests // 5
                per = max(4 if nfe < 50 else 2, total // c)
                for _ in range(args.repeats):  # u, b, u, b, ...: a load change hits both alike
                    for app in ("u", "b"):
                        rows[app].append(
                            await _closed_loop(session, f"{base}/{app}/v1/generate", nfe, c, per, pids, app)
                        )
            out["throughput"][str(nfe)] = rows
            print(f"throughput {nfe} NFE:", json.dumps(rows), flush=True)
        async with session.get(f"{base}/b/v1/stats") as r:
            out["stats_batched"] = await r.json()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default=str(ROOT / "runs/fashion_twinflow/export"))
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 50])
    p.add_argument("--requests", type=int, default=60, help="sequential requests per NFE (50 NFE: a third)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--throughput-nfe", type=int, nargs="+", default=[1, 4, 50])
    p.add_argument(
        "--throughput-requests",
        type=int,
        default=160,
        help="requests per throughput run (bounded; 50+ NFE: a fifth, at least 4 per client)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="u/b throughput pairs per client count (median ratio)"
    )
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="as in serve/fashion_demo.yaml")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    args.counts = {n: (max(10, args.requests // 3) if n >= 50 else args.requests) for n in args.nfe}
    args.counts.setdefault(1, args.requests)
    if not (Path(args.export) / "twinflow.json").is_file():
        print(
            f"error: {args.export} is no TwinFlow export; run `twinflow train jobs/fashion_twinflow.yaml` "
            "or pass --export",
            file=sys.stderr,
        )
        return 1

    load_start = os.getloadavg()
    t_start = time.time()
    import ray
    from ray import serve

    from twinflow.serve.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        common = {
            "models": [{"id": "demo", "path": args.export}],
            "auth_token_env": None,
            "limits": {"max_nfe": max(args.nfe + args.throughput_nfe)},
        }
        for name, max_batch in (("u", 1), ("b", 16)):
            cfg = dict(
                common,
                batching={"max_batch_images": max_batch, "batch_wait_timeout_s": args.batch_wait_ms / 1e3},
            )
            serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
        serve.run(echo_app(), name="echo", route_prefix="/echo", blocking=False)
        local = InProcess(args.export)
        http = asyncio.run(measure(f"http://127.0.0.1:{port}", local, args))
    finally:
        serve.shutdown()
        ray.shutdown()

    lat = http["latency"]
    overhead = {
        app: {nfe: round(lat[nfe][app]["p50_ms"] - lat[nfe]["in_process"]["p50_ms"], 2) for nfe in lat}
        for app in ("u", "b")
    }
    overhead["empty_app_floor"] = {"1": lat["1"]["echo"]["p50_ms"]}
    overhead["u_above_floor"] = {"1": round(overhead["u"]["1"] - lat["1"]["echo"]["p50_ms"], 2)}
    overhead["u_json"] = {"1": round(lat["1"]["u_json"]["p50_ms"] - lat["1"]["in_process"]["p50_ms"], 2)}
    overhead["b_json"] = {"1": round(lat["1"]["b_json"]["p50_ms"] - lat["1"]["in_process"]["p50_ms"], 2)}
    pairs = {nfe: _pairs(rows) for nfe, rows in http["throughput"].items()}
    speedup = {
        nfe: {c: _median([rb["req_per_s"] / ru["req_per_s"] for ru, rb in runs]) for c, runs in by_c.items()}
        for nfe, by_c in pairs.items()
    }
    speedup_runs = {
        nfe: {c: [round(rb["req_per_s"] / ru["req_per_s"], 2) for ru, rb in runs] for c, runs in by_c.items()}
        for nfe, by_c in pairs.items()
    }
    decomposition = {
        nfe: {
            c: {app: _mean_phases([run[i] for run in runs]) for i, app in enumerate("ub")}
            for c, runs in by_c.items()
        }
        for nfe, by_c in pairs.items()
    }
    # the same comparison in CPU time per request (what throughput becomes on a machine of our own)
    cpu_speedup = {
        nfe: {
            c: {
                "replica": _median(
                    [
                        ru["cpu_ms_per_request"]["replica"] / rb["cpu_ms_per_request"]["replica"]
                        for ru, rb in runs
                    ]
                ),
                "all_serve_processes": _median(
                    [ru["cpu_ms_per_request"]["total"] / rb["cpu_ms_per_request"]["total"] for ru, rb in runs]
                ),
            }
            for c, runs in by_c.items()
        }
        for nfe, by_c in pairs.items()
    }
    cpu_overhead = {
        nfe: {
            app: round(
                lat[nfe]["cpu_ms_per_request"][app]["total"] - lat[nfe]["cpu_ms_per_request"]["in_process"], 2
            )
            for app in ("u", "b")
        }
        for nfe in lat
    }
    cpu_overhead["1"]["empty_app_floor"] = lat["1"]["cpu_ms_per_request"]["echo"]["total"]
    result = {
        "command": "nice -n 5 .venv/bin/python benchmarks/serve_bench.py " + " ".join(argv or sys.argv[1:]),
        "export": os.path.relpath(args.export, ROOT),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "duration_s": round(time.time() - t_start, 1),
        "batch_wait_ms": args.batch_wait_ms,
        **http,
        "serve_overhead_p50_ms": overhead,
        "batching_speedup": speedup,
        "batching_speedup_runs": speedup_runs,
        "replica_phases_ms": decomposition,
        "batching_speedup_cpu": cpu_speedup,
        "serve_overhead_cpu_ms": cpu_overhead,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "serve_overhead_p50_ms",
                    "serve_overhead_cpu_ms",
                    "batching_speedup",
                    "batching_speedup_runs",
                    "batching_speedup_cpu",
                    "replica_phases_ms",
                )
            }
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
