"""Edit jobs end to end on real MNIST edit pairs: the shipped editor YAMLs train (in process, and once
through Ray Train + DeepSpeed ZeRO-3 from s3:// shards), export an editor, and `twinflow eval` scores it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twinflow.config import ConfigError
from twinflow.train.config import load_job

REPO = Path(__file__).resolve().parents[2]
FM_JOB = REPO / "jobs" / "mnist_edit_fm.yaml"
TF_JOB = REPO / "jobs" / "mnist_edit_twinflow.yaml"
SMALL = [
    "train.micro_batch=8",
    "train.log_every=1",
    "model.backbone={num_layers: 1}",
    "output.tensorboard=false",
]


@pytest.fixture(scope="module")
def edit_shards(tmp_path_factory):
    from twinflow.data import build_pipeline, load_pipeline

    out = tmp_path_factory.mktemp("mnist_edits") / "shards"
    cfg = load_pipeline(
        REPO / "pipelines" / "mnist_edits.yaml", [f"output={out}", "splits.eval.count=16", "limit=48"]
    )
    build_pipeline(cfg, progress=False)
    return out


def test_edit_job_refuses_a_null_condition_and_t2i_prompts():
    with pytest.raises(ConfigError, match=r"cond_dropout"):
        load_job(FM_JOB, ["method.cond_dropout=0.1"])
    with pytest.raises(ConfigError, match=r"enhanced_ratio"):
        load_job(TF_JOB, ["method.enhanced_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"eval.prompts"):
        load_job(FM_JOB, ["eval.prompts=[a handwritten digit one]"])
    assert load_job(FM_JOB).data.text_column == "instruction"


def test_edit_jobs_train_export_an_editor_and_eval_scores_it(edit_shards, tmp_path):
    """flow-matching editor (3 steps) -> export with tasks [generate, edit] -> TwinFlow fine-tune of it
    (2 steps) -> `run_edit_eval` at 1 and 2 NFE: metrics, the judge's class, the grid."""
    from twinflow.eval.edits import run_edit_eval
    from twinflow.models.text_encoder import TextEncoder
    from twinflow.train import modelling
    from twinflow.train.inprocess import load_memory_data, train_in_process

    fm = load_job(FM_JOB, [f"data.path={edit_shards}", *SMALL])
    enc = TextEncoder(max_length=fm.data.text_max_length)
    data = load_memory_data(fm.data, enc)
    assert data.refs is not None and data.refs.shape == data.images.shape  # source images kept
    assert not torch.equal(data.refs, data.images)
    run = train_in_process(fm, data=data, encoder=enc, steps=3)
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in run.history)
    x, cond = data.rows(torch.arange(4))
    assert cond["ref_image"].shape == x.shape
    with torch.no_grad():  # the reference reaches the model: another source changes the output
        t = torch.full((4,), 0.7)
        a = run.model(x, t, t, cond)
        b = run.model(x, t, t, {**cond, "ref_image": -cond["ref_image"]})
    assert (a - b).abs().max() > 1e-4
    fm_export = modelling.export(fm, run.sampling_model, tmp_path / "fm" / "export", steps=3)
    meta = json.loads((fm_export / "twinflow.json").read_text())
    assert meta["tasks"] == ["generate", "edit"] and meta["edit_data"] == str(edit_shards)

    tf = load_job(  # TwinFlow fine-tune of the editor under LoRA
        TF_JOB, [f"data.path={edit_shards}", f"train.init_from={fm_export}", "model.lora.rank=4", *SMALL]
    )
    tuned = train_in_process(tf, data=data, encoder=enc, steps=2)
    tf_export = modelling.export(tf, tuned.sampling_model, tmp_path / "tf" / "export", steps=2)
    tf_meta = json.loads((tf_export / "twinflow.json").read_text())
    assert tf_meta["tasks"] == ["generate", "edit"] and tf_meta["lora"]

    report = run_edit_eval(
        [str(fm_export), str(tf_export)],
        nfe=[1, 2],
        edits=str(edit_shards),
        dataset="mnist",
        limit=8,
        out_dir=tmp_path / "eval",
    )
    fm_r, tf_r = report["checkpoints"]
    assert fm_r["per_nfe"]["1"]["sampler"] == "ode" and tf_r["per_nfe"]["2"]["sampler"] == "few"
    for r in (fm_r, tf_r):
        for m in r["per_nfe"].values():
            assert 0 < m["edit_mse"] < 4 and 0 < m["edit_psnr"] < 100
            assert 0 <= m["edit_class_kept"] <= 1 and 0 <= m["edit_label_kept"] <= 1
        assert r["pairs"] == 8 and 0 < r["floor"]["edit_label_kept_floor"] <= 1
        by_op = r["per_nfe"]["1"]["by_op"]  # ops from the shards' edit column
        assert set(by_op) <= {"rotate", "flip", "invert", "shift", "thicker", "thinner"}
        assert sum(v["pairs"] for v in by_op.values()) == 8
        assert Path(r["grid"]).stat().st_size > 0
    assert "judge reads the instructed class" in (tmp_path / "eval" / "results.md").read_text()

    # the sweep's scoring of a trial (tune/mnist_edit_lambda.yaml's evaluator) on the same export
    from twinflow.tune.config import EvaluationConfig
    from twinflow.tune.evaluation import evaluate_export

    evaluation = EvaluationConfig(nfe=[1, 2], evaluator="twinflow.eval.edits:tune_evaluator", samples=8)
    scores = evaluate_export(str(tf_export), tf.model_dump_json(), evaluation.model_dump_json())
    assert scores["eval/edit_psnr_nfe2"] == pytest.approx(tf_r["per_nfe"]["2"]["edit_psnr"], rel=1e-4)
    assert {"eval/edit_mse_nfe1", "eval/edit_class_kept_nfe1"} <= set(scores)


def test_edit_metrics_of_exact_and_wrong_outputs(edit_shards):
    """An output equal to its target scores the PSNR cap and the judge's class; the source does not."""
    from twinflow.eval.edits import edit_metrics, judge_floor, load_edit_pairs
    from twinflow.eval.judges import load_judge

    pairs = load_edit_pairs(str(edit_shards), limit=16)
    judge = load_judge("mnist")
    exact = edit_metrics(pairs.target, pairs, judge)
    assert exact["edit_mse"] == 0 and exact["edit_psnr"] == 100 and exact["edit_class_kept"] == 1
    assert exact["edit_label_kept"] == judge_floor(pairs, judge)["edit_label_kept_floor"]
    unedited = edit_metrics(pairs.source, pairs, judge)
    assert unedited["edit_psnr"] < 30 and unedited["edit_mse"] > 0.01


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_edit_job_under_ray_train_zero3_from_s3_shards(ray_cluster, edit_shards, tmp_path, s3_server, bucket):
    """The real path: 2 Ray Train workers, DeepSpeed ZeRO-3, edit shards streamed from s3://."""
    from twinflow.storage import upload_dir
    from twinflow.train.launcher import run_job

    uri = f"s3://{bucket}/mnist_edits"
    upload_dir(str(edit_shards), uri)
    job = load_job(
        FM_JOB,
        [
            f"data.path={uri}",
            f"output.dir={tmp_path}",
            "name=edit_zero3",
            "deepspeed.zero_stage=3",
            "train.steps=2",
            "train.checkpoint_every=2",
            "data.shuffle_buffer=16",
            *SMALL,
        ],
    )
    result = run_job(job)
    assert result.ok, result.error
    meta = json.loads((Path(result.export_dir) / "twinflow.json").read_text())
    assert meta["tasks"] == ["generate", "edit"] and result.metrics["samples_seen"] == 2 * 8 * 2
