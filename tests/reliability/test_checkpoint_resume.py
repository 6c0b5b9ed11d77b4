"""Defects 1 and 2 end to end, on a stopped job: a real 2-worker DeepSpeed run that dies with no retries
left ERRORS; running it again resumes, and as its newest checkpoints are damaged, from the newest good
one; it logs every step once and exports finite weights. `--fresh` then really starts over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from twinflow.models.export_loader import load_generator
from twinflow.train import manifest
from twinflow.train.launcher import run_job

from .helpers import MICRO, WORLD, checkpoint_dirs, logged_steps, make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def test_a_stopped_job_reruns_from_its_newest_good_checkpoint(ray_cluster, fashion_small, tmp_path):
    def job(*extra: str):
        return make_job(
            fashion_small,
            tmp_path,
            "ckfall",
            "train.steps=4",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=3",
            *extra,
        )

    first = run_job(job("train.max_failures=0"), fault_at_step=4)
    assert not first.ok and first.state == "ERRORED"
    run = Path(first.run_dir)
    assert json.loads((run / "summary.json").read_text())["state"] == "ERRORED"
    assert logged_steps(run) == [1, 2, 3]  # the crash came before step 4 was logged
    c1, c2, c3 = checkpoint_dirs(run)
    assert [manifest.manifest_step(c) for c in (c1, c2, c3)] == [1, 2, 3]
    assert all(manifest.verify(c) == [] for c in (c1, c2, c3))  # ranks' manifests agree after Ray merges them

    tensors = sorted((c3 / "ckpt").glob("*optim_states.pt"))
    victim = tensors[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # newest: truncated
    damaged = sorted((c2 / "ckpt").glob("*.pt"))[0]
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 4096] = os.urandom(4096)  # next: 4 KB of random bytes inside
    damaged.write_bytes(bytes(raw))

    second = run_job(job())  # the same job again, as a user reruns it
    assert second.ok, second.error
    text = (run / "logs" / "checkpoints.log").read_text()  # rank 0's restore notes (also on its stdout)
    assert f"skipping checkpoint {c3}" in text and victim.name in text and "truncated" in text
    assert f"skipping checkpoint {c2}" in text and damaged.name in text and "sha256" in text
    assert f"fell back to checkpoint {c1} (step 1)" in text
    assert logged_steps(run) == list(range(1, 5))  # every step once: 1 kept, 2-4 retrained
    rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data/bad_records"] == 0 for r in rows if "total" in r)  # per step, not only at the end
    # samples_seen is carried in the checkpoint: any replayed step would inflate it
    assert second.metrics["samples_seen"] == 4 * MICRO * WORLD
    gen, meta = load_generator(run / "export")
    assert meta["steps"] == 4 and all(torch.isfinite(p).all() for p in gen.parameters())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["state"] == "FINISHED"
    assert [a["state"] for a in summary["attempts"]] == ["ERRORED", "FINISHED"]
    assert summary["bad_records"]["bad"] == 0 and second.metrics["data/bad_records"] == 0

    # and --fresh really starts over
    third = run_job(make_job(fashion_small, tmp_path, "ckfall", "train.steps=2"), fresh=True)
    assert third.ok and third.steps == 2 and third.metrics["samples_seen"] == 2 * MICRO * WORLD
    assert logged_steps(run) == [1, 2]
