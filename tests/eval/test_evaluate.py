"""evaluate_generator / the edit metrics on in-memory models, and `twinflow eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from twinflow.eval.metrics import evaluate_generator

from .conftest import tiny_generator

KEYS = ("fd", "adherence", "diversity", "collapse", "saturation")
AE_KEYS = ("fd_ae", "diversity_ae", "collapse_ae")  # the second feature space, beside the judge's
REPO = Path(__file__).resolve().parents[2]


def test_evaluate_generator_keys_determinism_and_cond(mnist_judge, mnist_reference, text_encoder):
    model = tiny_generator()
    model.train()
    prompts = ["a handwritten digit seven", "digit 3"]
    kw = dict(reference=mnist_reference, images_per_prompt=6, batch_size=5, seed=1)
    a = evaluate_generator(model, prompts, [2, 1], mnist_judge, text_encoder=text_encoder, **kw)
    assert model.training  # mode restored
    assert set(a) == {f"eval/{k}_nfe{n}" for k in KEYS + AE_KEYS for n in (1, 2)} | {
        "eval/fd_floor",
        "eval/diversity_floor",
        "eval/saturation_floor",
        "eval/fd_ae_floor",
        "eval/diversity_ae_floor",
    }
    assert all(v == v for v in a.values())  # no NaN
    assert 0.0 <= a["eval/saturation_nfe1"] <= 1.0 and 0.0 < a["eval/saturation_floor"] < 0.5
    # pre-encoded prompts (the training loop's eval_cond) give the same numbers
    cond = text_encoder.encode(prompts)
    b = evaluate_generator(model, prompts, [1, 2], mnist_judge, cond=cond, **kw)
    assert b == pytest.approx(a, rel=1e-6)
    # a random model neither adheres nor matches the data; another seed gives other samples
    assert a["eval/adherence_nfe1"] <= 0.5 and a["eval/fd_nfe1"] > 20 * a["eval/fd_floor"]
    c = evaluate_generator(model, prompts, [1], mnist_judge, text_encoder=text_encoder, **{**kw, "seed": 2})
    assert c["eval/fd_nfe1"] != a["eval/fd_nfe1"]
    with pytest.raises(ValueError, match="does not name exactly one"):
        evaluate_generator(model, ["a cat"], [1], mnist_judge, text_encoder=text_encoder, **kw)
    with pytest.raises(ValueError, match="NFE"):
        evaluate_generator(model, prompts, [0], mnist_judge, text_encoder=text_encoder, **kw)


class PerfectEditor(torch.nn.Module):
    """G = (x - ref) / t: every few-style step lands exactly on the reference image."""

    sample_shape = (1, 28, 28)

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, r, cond):
        return (x - cond["ref_image"]) / t.view(-1, 1, 1, 1)


def test_edit_metrics_psnr_and_class_kept(mnist_judge, text_encoder):
    from twinflow.eval.datasets import load_split
    from twinflow.eval.edits import EditPairs, edit_metrics, judge_floor, sample_edits
    from twinflow.method.sampler import settings_for

    held = load_split("mnist", "heldout")
    src, labels = held.as_float()[:12], torch.as_tensor(held.labels[:12]).long()
    same = EditPairs(src, src, ["keep it"] * 12, labels, [str(i) for i in range(12)], ["?"] * 12)
    for nfe in (1, 2):
        out = sample_edits(
            PerfectEditor(), same, settings_for("twinflow", nfe), encoder=text_encoder, batch_size=5
        )
        m = edit_metrics(out, same, mnist_judge)
        assert m["edit_psnr"] == 100.0 and m["edit_mse"] == pytest.approx(0.0, abs=1e-10)
        assert m["edit_class_kept"] == 1.0
    assert judge_floor(same, mnist_judge)["edit_label_kept_floor"] == pytest.approx(
        mnist_judge.accuracy(src, labels)
    )
    # targets flipped upside down: the output (the source) misses them by a known MSE
    flipped = EditPairs(src, src.flip(-2), same.instructions, labels, same.ids, same.ops)
    out = sample_edits(PerfectEditor(), flipped, settings_for("twinflow", 1), encoder=text_encoder)
    got = edit_metrics(out, flipped)
    mse = (src - src.flip(-2)).pow(2).flatten(1).mean(1)
    assert got["edit_mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert got["edit_psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()), rel=1e-5)


def test_eval_edits_flag_scores_through_the_editor_path(tmp_path, mnist_judge):
    """`twinflow eval <text-to-image> --edits` scores with the editor evaluation (`eval/edits.py`):
    the same pairs, noise and metrics give the same numbers as `evaluate_editor`."""
    from twinflow.data import build_pipeline, load_pipeline
    from twinflow.eval.edits import evaluate_editor, judge_floor, load_edit_pairs
    from twinflow.eval.job import EvalRequest, _edit_scores, resolve_checkpoints
    from twinflow.export_reader import open_export
    from twinflow.models import save_generator

    export = tmp_path / "export"
    save_generator(tiny_generator(seed=3), export, {"method": "twinflow", "job": "tiny"})
    edits = tmp_path / "mnist_edits"
    build_pipeline(
        load_pipeline(REPO / "pipelines" / "mnist_edits.yaml", [f"output={edits}", "limit=6"]), progress=False
    )
    req = EvalRequest(
        checkpoints=[str(export)],
        dataset="mnist",
        nfe=[1, 2],
        edits=str(edits),
        edit_limit=7,
        batch_size=5,
        seed=5,
    )
    got = _edit_scores(req, resolve_checkpoints(req)[0], mnist_judge)
    pairs = load_edit_pairs(str(edits), limit=7, image_size=28, channels=1)
    per_nfe, _ = evaluate_editor(
        open_export(str(export)), pairs, [1, 2], mnist_judge, sampler="few", seed=5, batch_size=5
    )
    for n in (1, 2):
        for k in ("edit_mse", "edit_psnr", "edit_class_kept", "edit_label_kept"):
            assert got[f"{k}_nfe{n}"] == per_nfe[n][k], (k, n)
    assert got["edit_label_kept_floor"] == judge_floor(pairs, mnist_judge)["edit_label_kept_floor"]
    assert 0 < got["edit_mse_nfe1"] <= 4


def _cli(argv):
    from twinflow.cli import main

    return main(argv)


def test_cli_errors_are_clear(tmp_path, capsys):
    ck = tmp_path / "run" / "export"
    tiny = tiny_generator()
    from twinflow.models import save_generator

    save_generator(tiny, ck, {"method": "twinflow", "job": "tiny"})
    cases = [
        (["eval", str(tmp_path / "missing")], "does not exist"),
        (["eval", str(tmp_path)], "not a TwinFlow export"),
        (["eval", str(ck), "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["eval", str(ck), "--dataset", "mnist", "--nfe", "1,zero"], "bad NFE 'zero'"),
        (["eval", str(ck)], "pass --dataset"),  # no job.json beside the export
        (["eval", str(ck), "--dataset", "mnist", "--classes", "3,12"], "out of range"),
    ]
    for argv, message in cases:
        assert _cli(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.integration
def test_twinflow_eval_end_to_end(ray_cluster, tmp_path, mnist_judge, mnist_reference, text_encoder):
    """`twinflow eval` on a checkpoint made here: 2 actors sample on Ray Data; the numbers equal the
    in-process evaluate_generator on the same model (same prompts, noise and judge)."""
    from twinflow.eval.job import sample_plan
    from twinflow.models import save_generator
    from twinflow.models.export_loader import load_generator

    run = tmp_path / "runs" / "tiny_mnist"
    save_generator(
        tiny_generator(seed=3), run / "export", {"method": "flow_matching", "job": "tiny_mnist", "steps": 7}
    )
    from twinflow.data import build_pipeline, load_pipeline

    # the shipped MNIST shards: the dataset is inferred from them, the real images read from them
    data = tmp_path / "data" / "mnist_digits"
    build_pipeline(
        load_pipeline(REPO / "pipelines" / "mnist_digits.yaml", [f"output={data}"]), progress=False
    )
    (run / "job.json").write_text(json.dumps({"data": {"path": str(data)}}))

    edits = tmp_path / "mnist_edits"
    build_pipeline(
        load_pipeline(REPO / "pipelines" / "mnist_edits.yaml", [f"output={edits}", "limit=6"]), progress=False
    )
    out = tmp_path / "eval"
    argv = [
        "eval",
        str(run),
        "--nfe",
        "1,3",
        "--classes",
        "1,7",
        "--samples-per-class",
        "5",
        "--batch-size",
        "4",
        "--actors",
        "2",
        "--actor-cpus",
        "0.5",
        "--seed",
        "5",
        "--out",
        str(out),
        "--grid-per-class",
        "3",
        "--edits",
        str(edits),
    ]
    assert _cli(argv) == 0
    report = json.loads((out / "results.json").read_text())
    entry = report["checkpoints"][0]
    assert entry["dataset"] == "mnist" and entry["sampler"] == "ode" and entry["name"] == "tiny_mnist"
    assert (out / "results.md").read_text().count("| tiny_mnist | mnist |") == 2  # one row per NFE
    assert (out / "grids" / "tiny_mnist.png").stat().st_size > 0
    model, _ = load_generator(run / "export")
    prompts, classes = sample_plan("mnist", [1, 7], 5)
    assert prompts[5] == "a handwritten digit seven" and classes == [1] * 5 + [7] * 5
    direct = evaluate_generator(
        model,
        prompts,
        [1, 3],
        mnist_judge,
        reference=mnist_reference,
        text_encoder=text_encoder,
        images_per_prompt=1,
        sampler="ode",
        seed=5,
        batch_size=4,
    )
    for nfe in (1, 3):
        for k in KEYS + AE_KEYS:
            assert entry["nfe"][str(nfe)][k] == pytest.approx(
                direct[f"eval/{k}_nfe{nfe}"], rel=1e-4, abs=1e-6
            )
    assert entry["floor"]["fd"] == pytest.approx(direct["eval/fd_floor"])
    assert entry["floor"]["fd_ae"] == pytest.approx(direct["eval/fd_ae_floor"])
    # the second feature space is named in the report and has its columns in results.md
    assert report["datasets"]["mnist"]["feature_space"]["name"] == "ae"
    assert "FD, AE space" in (out / "results.md").read_text()
    # edit pairs (6 held-out sources x 2 edits): scored against their exact targets
    assert set(entry["edits"]) >= {
        "edit_mse_nfe1",
        "edit_psnr_nfe3",
        "edit_class_kept_nfe1",
        "edit_label_kept_floor",
    }
    assert (
        0 < entry["edits"]["edit_mse_nfe1"] <= 4 and "| tiny_mnist | 3 |" in (out / "results.md").read_text()
    )


def test_periodic_metrics_hook(tmp_path, mnist_judge, mnist_reference, text_encoder):
    """Training's hook: dataset from the shards' manifest, sampler from the method, real images from
    the shards (pipelines/mnist_digits.yaml as shipped: the same numbers as evaluate_generator with
    the source's reference); unknown data (a user folder) gives no metrics instead of failing the job."""
    from twinflow.data import build_pipeline, load_pipeline
    from twinflow.eval.periodic import check_prompts, dataset_of, periodic_metrics

    shards = tmp_path / "mnist_digits"
    build_pipeline(
        load_pipeline(REPO / "pipelines" / "mnist_digits.yaml", [f"output={shards}"]), progress=False
    )

    (tmp_path / "manifest.json").write_text(json.dumps({"source": {"type": "mnist_digits"}}))
    assert dataset_of(str(tmp_path)) == "mnist" and dataset_of(str(tmp_path / "nope")) is None
    model = tiny_generator(seed=1)
    prompts = ["a handwritten digit zero", "a handwritten digit eight"]
    cond = text_encoder.encode(prompts)
    got = periodic_metrics(
        model,
        dataset="mnist",
        reference=(str(shards), None),
        prompts=prompts,
        cond=cond,
        nfe=[1],
        method="flow_matching",
        images_per_prompt=4,
        seed=9,
    )
    want = evaluate_generator(
        model,
        prompts,
        [1],
        mnist_judge,
        reference=mnist_reference,
        cond=cond,
        images_per_prompt=4,
        sampler="ode",
        seed=9,
    )
    assert got == pytest.approx(want)
    none = periodic_metrics(
        model, dataset=None, reference=None, prompts=prompts, cond=cond, nfe=[1], method="twinflow"
    )
    assert none == {}
    with pytest.raises(ValueError, match="a handwritten cat"):
        check_prompts("mnist", ["a handwritten cat"])
