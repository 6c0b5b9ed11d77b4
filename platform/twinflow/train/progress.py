"""What a user sees while a job runs: a progress line, metrics JSONL, TensorBoard, a loss plot.

Only rank 0 writes. On resume the JSONL is cut back to the checkpoint's step, so after a worker
failure every step appears exactly once in the log. Rank 0's lines (start, progress, eval) also go to
`<run>/logs/progress.log`; a driver that does not get the workers' output from Ray (a local cluster,
quiet by default) prints them from there with `FollowLines`, so each line shows once, without Ray's
own chatter around it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricsLog:
    """Append-only JSONL of step metrics, truncated to `resume_step` when a run resumes."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard_dir: Path | None = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_step)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; tolerate a slim install
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(
                    str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None
                )

    def _truncate(self, resume_step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if row.get("step", 0) <= resume_step:
                kept.append(json.dumps(row))
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ProgressLog:
    """Rank 0's human-readable lines: appended to `path` and logged (Ray forwards a worker's log to
    the driver and to `ray job logs` when it forwards worker output at all)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        with self.path.open("a") as fh:
            fh.write(line + "\n")
        log.info(line)


class FollowLines:
    """Driver side: emits the lines appended to `paths` after it started, until `stop()`.

    `strip_stamp` paths start each line with a timestamp token (logs/checkpoints.log): dropped."""

    def __init__(
        self,
        paths: list[Path],
        emit: Callable[[str], None],
        strip_stamp: tuple[Path, ...] = (),
        every_s: float = 0.3,
    ):
        self.emit, self.every_s, self.strip = emit, every_s, set(strip_stamp)
        self.offsets = {p: (p.stat().st_size if p.exists() else 0) for p in paths}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="twinflow-follow", daemon=True)

    def poll(self) -> None:
        for path, offset in self.offsets.items():
            if not path.exists():
                continue
            start = offset if path.stat().st_size >= offset else 0  # a file cut shorter: from the top
            with path.open("rb") as fh:
                fh.seek(start)
                chunk = fh.read()
            done = chunk.rfind(b"\n") + 1  # whole lines only; a half-written one waits
            self.offsets[path] = start + done
            for raw in chunk[:done].decode(errors="replace").splitlines():
                line = raw.split(" ", 1)[-1] if path in self.strip else raw
                if line.strip():
                    self.emit(line)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def __enter__(self) -> FollowLines:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()


class ProgressLine:
    """`step 120/2000 | loss 0.123 (e2e .. adv ..) | 45.1 samples/s | ETA 3m12s` every log interval."""

    def __init__(self, total_steps: int, start_step: int, samples_per_step: int):
        self.total = total_steps
        self.samples_per_step = samples_per_step
        self._t0 = time.perf_counter()
        self._s0 = start_step

    def rate(self, step: int) -> float:
        dt = time.perf_counter() - self._t0
        return (step - self._s0) / dt if dt > 0 else float("nan")

    def line(self, step: int, metrics: dict[str, float]) -> str:
        steps_per_s = self.rate(step)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        groups = " ".join(
            f"{k.removeprefix('loss_')} {v:.4f}"
            for k, v in metrics.items()
            if k.startswith("loss_") and math.isfinite(v)
        )
        total = metrics.get("total", float("nan"))
        return (
            f"step {step}/{self.total} | loss {total:.4f}"
            + (f" ({groups})" if groups else "")
            + f" | {steps_per_s * self.samples_per_step:.1f} samples/s | ETA {format_eta(eta)}"
        )


def plot_losses(jsonl: Path, out_png: Path) -> Path | None:
    """Loss curves (total and per group) from the metrics log; None when there is nothing to plot."""
    rows = (
        [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        if jsonl.exists()
        else []
    )
    rows = [r for r in rows if "total" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k == "total" or k.startswith("loss_")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, lw=2 if key == "total" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
