"""A job reads only the paths it names: periodic eval's real images come from its shards (or
`eval.reference`), never from a source folder beside the code, and pre-flight checks every such path
before Ray starts, one line each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from twinflow.config import ConfigError
from twinflow.train.config import load_job
from twinflow.train.resolved import resolve_job as check_inputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mnist_full(tmp_path_factory):
    """pipelines/mnist_digits.yaml as shipped (10k digits, ~10 s): its eval split is the judge's held-out one."""
    from twinflow.data import build_pipeline, load_pipeline

    out = tmp_path_factory.mktemp("mnist_full") / "shards"
    build_pipeline(load_pipeline(REPO / "pipelines" / "mnist_digits.yaml", [f"output={out}"]), progress=False)
    return out


def test_the_shards_give_the_same_real_images_and_numbers_as_the_source(mnist_full):
    from twinflow.eval.datasets import load_split, shard_split
    from twinflow.eval.judges import load_judge
    from twinflow.eval.metrics import real_reference, real_saturation

    for split in ("heldout", "train"):
        src, shards = load_split("mnist", split), shard_split("mnist", split, str(mnist_full))
        assert np.array_equal(src.images, shards.images) and np.array_equal(src.labels, shards.labels)
    judge = load_judge("mnist")
    a = real_reference(judge, use_disk=False)
    b = real_reference(judge, str(mnist_full), use_disk=False)
    for k in ("heldout_features", "heldout_labels", "train_features", "train_labels"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    classes = [0, 3, 7, 8] * 8
    assert b.floor(classes) == a.floor(classes)
    assert b.saturation([0, 3]) == real_saturation("mnist", [0, 3]) and b.saturation() == real_saturation(
        "mnist"
    )


def test_periodic_metrics_read_the_shards_not_the_source(monkeypatch, tmp_path, mnist_small):
    """The source folder and the reference cache are gone (a fresh node): the metrics still come."""
    from twinflow.eval import datasets
    from twinflow.eval.periodic import periodic_metrics
    from twinflow.models.config import ModelConfig
    from twinflow.models.generator import build_generator
    from twinflow.models.text_encoder import TextEncoder

    def no_source():
        raise AssertionError("read the MNIST source folder")

    monkeypatch.setattr(datasets, "_mnist_arrays", no_source)
    monkeypatch.setenv("TWINFLOW_EVAL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g")).eval()
    prompts = ["a handwritten digit zero", "a handwritten digit eight"]
    got = periodic_metrics(
        model,
        dataset="mnist",
        reference=(str(mnist_small), None),
        prompts=prompts,
        cond=TextEncoder(max_length=16).encode(prompts),
        nfe=[1],
        method="twinflow",
        images_per_prompt=2,
    )
    assert np.isfinite(got["eval/fd_nfe1"]) and 0 <= got["eval/adherence_nfe1"] <= 1
    assert list((tmp_path / "cache").glob("reference-mnist-*.pt"))  # keyed by the shards' checksums


def _job(data, out, *extra):
    return load_job(REPO / "jobs" / "mnist_base_fm.yaml", [f"data.path={data}", f"output.dir={out}", *extra])


def test_pre_flight_refuses_shards_without_an_eval_split(tmp_path):
    from twinflow.data import build_pipeline, load_pipeline

    shards = tmp_path / "train_only"
    cfg = load_pipeline(
        REPO / "pipelines" / "mnist_digits.yaml",
        [f"output={shards}", "splits={train: {count: 32}}", "shard_size=64"],
    )
    build_pipeline(cfg, progress=False)
    with pytest.raises(ConfigError) as err:
        check_inputs(_job(shards, tmp_path / "runs"))
    msg = str(err.value)
    assert msg.startswith("data.path: ") and "no 'eval' split" in msg and "\n" not in msg
    assert "eval.reference" in msg and "--set eval.metrics=false" in msg
    check_inputs(_job(shards, tmp_path / "runs", "eval.metrics=false"))  # no metrics: no real images needed


def test_pre_flight_checks_the_eval_reference_and_model_paths(tmp_path, mnist_small):
    with pytest.raises(ConfigError, match=r"^eval.reference: .*/nope does not exist$"):
        check_inputs(_job(mnist_small, tmp_path / "runs", f"eval.reference={tmp_path / 'nope'}"))
    check_inputs(_job(mnist_small, tmp_path / "runs", f"eval.reference={mnist_small}"))
    with pytest.raises(ConfigError, match=r"^data.text_encoder_dir: .*/no_encoder does not exist$"):
        check_inputs(_job(mnist_small, tmp_path / "runs", f"data.text_encoder_dir={tmp_path / 'no_encoder'}"))


def test_a_deterministic_worker_error_stops_the_run_and_others_are_retried():
    from twinflow.train.failures import (
        DeterministicFailure,
        StopOnDeterministicFailure,
        deterministic_message,
    )

    stop = StopOnDeterministicFailure()
    stop.after_exception(None, {0: RuntimeError("gloo: connection reset"), 1: TimeoutError()})  # retried
    with pytest.raises(DeterministicFailure, match=r"^rank 1: FileNotFoundError: /x/twinflow.json$"):
        stop.after_exception(
            None, {0: RuntimeError("collective aborted"), 1: FileNotFoundError("/x/twinflow.json")}
        )

    class Reported(Exception):
        controller_failure = DeterministicFailure("rank 0: ConfigError: data.path: bad")

    assert deterministic_message(Reported()) == "rank 0: ConfigError: data.path: bad"
    assert deterministic_message(RuntimeError()) is None
