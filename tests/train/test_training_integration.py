"""Real training jobs: 2 Ray Train workers running DeepSpeed (gloo) on CPU, a few steps each.

One local Ray cluster for the session (tests/conftest.py). Every job trains the tiny Qwen-Image
backbone on 96 real Fashion-MNIST records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twinflow.models.export import load_generator
from twinflow.train.config import load_job
from twinflow.train.launcher import run_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

JOBS = Path(__file__).resolve().parents[2] / "jobs"
MICRO = 8
WORLD = 2


def make_job(shards: Path, out: Path, name: str, *extra: str, base: str = "fashion_base_fm.yaml"):
    return load_job(
        JOBS / base,
        [
            f"name={name}",
            f"data.path={shards}",
            f"output.dir={out}",
            "data.shuffle_buffer=32",
            f"train.micro_batch={MICRO}",
            "train.steps=4",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "eval.prompts=[a photo of a sneaker, a photo of a bag]",
            "eval.nfe=[1, 2]",
            "eval.images_per_prompt=2",
            "eval.metric_images_per_prompt=8",
            "output.tensorboard=false",
            *extra,
        ],
    )


def logged_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return [r["step"] for r in rows if "total" in r]  # training lines; eval lines carry "eval/..." keys


def check_finished(result, steps: int) -> Path:
    assert result.ok, result.error
    assert result.state == "FINISHED"
    assert result.steps == steps
    run = Path(result.run_dir)
    assert logged_steps(run) == list(range(1, steps + 1))  # every step logged once, none twice
    # samples_seen is carried in the checkpoint: any replayed step would inflate it
    assert result.metrics["samples_seen"] == steps * MICRO * WORLD
    assert (run / "samples" / "final.png").stat().st_size > 0
    assert json.loads((run / "summary.json").read_text())["state"] == "FINISHED"
    return run


def test_zero2_full_parameters_then_lora_finetune(ray_cluster, fashion_small, tmp_path):
    base = run_job(make_job(fashion_small, tmp_path, "z2"))
    run = check_finished(base, 4)
    gen, meta = load_generator(run / "export")
    assert meta["method"] == "flow_matching" and meta["steps"] == 4
    # the final step's judge metrics (twinflow.eval) reach the report, per NFE
    for nfe in (1, 2):
        assert 0.0 <= base.metrics[f"eval/adherence_nfe{nfe}"] <= 1.0
        assert base.metrics[f"eval/fd_nfe{nfe}"] > 0.0
    assert all(torch.isfinite(p).all() for p in gen.parameters())

    # LoRA (peft) under DeepSpeed, fine-tuning the export above with the TwinFlow objective
    lora = run_job(
        make_job(
            fashion_small,
            tmp_path,
            "z2_lora",
            f"train.init_from={run / 'export'}",
            "model.lora.rank=4",
            base="fashion_twinflow.yaml",
        )
    )
    lrun = check_finished(lora, 4)
    tuned, tmeta = load_generator(lrun / "export")
    assert tmeta["method"] == "twinflow"
    assert any(k.startswith("loss_") for k in lora.metrics)
    # LoRA trained something, starting from the base export's weights
    base_sd, tuned_sd = gen.state_dict(), tuned.state_dict()
    changed = [k for k in base_sd if not torch.equal(base_sd[k], tuned_sd[k])]
    assert changed and len(changed) < len(base_sd)


def test_zero3_full_parameters(ray_cluster, fashion_small, tmp_path):
    result = run_job(
        make_job(
            fashion_small,
            tmp_path,
            "z3",
            "deepspeed.zero_stage=3",
            "method.cond_dropout=0.0",
            "method.sample_guidance=0.0",
        )
    )
    run = check_finished(result, 4)
    gen, _ = load_generator(run / "export")  # ZeRO-3 shards gathered into a whole model
    assert sum(p.numel() for p in gen.parameters()) > 100_000


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, fashion_small, tmp_path):
    """Rank 1 exits for real at step 3; Ray Train restarts the group from the step-2 checkpoint."""
    result = run_job(
        make_job(fashion_small, tmp_path, "kill", "train.fail_at_step=3", "train.max_failures=1")
    )
    run = check_finished(result, 4)
    assert (run / ".injected_failure_step3").exists()  # the process really died once


def test_stopped_job_resumes_on_rerun(ray_cluster, fashion_small, tmp_path):
    """A job that dies with no retries left ERRORS; running it again continues at its last checkpoint."""
    first = run_job(make_job(fashion_small, tmp_path, "stop", "train.fail_at_step=3", "train.max_failures=0"))
    assert not first.ok and first.state == "ERRORED"
    run = Path(first.run_dir)
    assert json.loads((run / "summary.json").read_text())["state"] == "ERRORED"
    assert logged_steps(run) == [1, 2]  # the crash came before step 3 was logged

    second = run_job(make_job(fashion_small, tmp_path, "stop"))
    check_finished(second, 4)

    # and --fresh really starts over
    third = run_job(make_job(fashion_small, tmp_path, "stop", "train.steps=2"), fresh=True)
    assert third.ok and third.steps == 2 and third.metrics["samples_seen"] == 2 * MICRO * WORLD


def test_output_on_s3_then_finetune_from_the_s3_export(
    ray_cluster, fashion_small, tmp_path, s3_server, bucket, monkeypatch
):
    """output.dir on s3://: checkpoints through Ray Train's S3 storage, the rest uploaded at the end."""
    from twinflow.storage import list_files

    monkeypatch.setenv("TWINFLOW_STAGING_DIR", str(tmp_path / "staging"))
    out = f"s3://{bucket}/runs"
    result = run_job(make_job(fashion_small, tmp_path, "on_s3", f"output.dir={out}", "train.steps=2"))
    assert result.ok, result.error
    assert result.remote_dir == f"{out}/on_s3" and result.export_dir == f"{out}/on_s3/export"
    names = set(list_files(f"{out}/on_s3"))
    assert {"summary.json", "logs/metrics.jsonl", "export/twinflow.json", "samples/final.png"} <= names
    assert any(n.startswith("checkpoint_") for n in names)  # Ray Train wrote its checkpoints to S3
    assert any(n.startswith("export/transformer/") for n in names)

    tuned = run_job(
        make_job(fashion_small, tmp_path, "from_s3", f"train.init_from={result.export_dir}", "train.steps=2")
    )
    assert tuned.ok, tuned.error
