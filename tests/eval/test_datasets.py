"""Datasets as evaluation sees them: prompt -> class, templates, held-out splits, NFE/sampler checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from twinflow.eval.datasets import UnknownDatasetError, canonical_name, get_dataset, mnist_split_indices
from twinflow.eval.sampling import SAMPLER_METHODS, check_nfe, plan_units, resolve_sampler
from twinflow.method.sampler import settings_for

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, pipeline", [("fashion_mnist", "fashion_mnist.yaml"), ("mnist", "mnist_digits.yaml")]
)
def test_templates_are_the_training_captions(name, pipeline):
    cfg = yaml.safe_load((REPO / "pipelines" / pipeline).read_text())
    ds = get_dataset(name)
    assert list(ds.templates) == cfg["source"]["captions"]
    # every prompt made from the templates maps back to its class
    for c in range(ds.num_classes):
        for i in range(len(ds.templates)):
            assert ds.class_of(ds.prompt(c, i)) == c


@pytest.mark.parametrize(
    "prompt, cls",
    [
        ("a photo of a t-shirt", 0),
        ("a photo of a shirt", 6),
        ("a T shirt", 0),
        ("a photo of a trouser", 1),
        ("a pair of trousers on a black background", 1),
        ("an ankle boot", 9),
        ("some boots", 9),
        ("a photo of a sneaker", 7),
        ("a coat and a jacket", 4),
        ("a bag next to a dress", None),
        ("a photo of a cat", None),
        ("a shirtless man", None),
    ],
)
def test_fashion_prompt_to_class(prompt, cls):
    assert get_dataset("fashion_mnist").class_of(prompt) == cls


def test_mnist_prompt_to_class_and_errors():
    ds = get_dataset("mnist")
    assert [
        ds.class_of(p)
        for p in ["a handwritten digit seven", "digit 7", "the number 0", "seventeen", "one or two"]
    ] == [7, 7, 0, None, None]
    with pytest.raises(ValueError, match="does not name exactly one mnist class"):
        ds.classes_of(["a handwritten digit seven", "a cat"])
    with pytest.raises(UnknownDatasetError, match="unknown dataset 'cifar'"):
        get_dataset("cifar")
    assert canonical_name("Fashion-MNIST") == "fashion_mnist" and canonical_name("mnist_digits") == "mnist"


def test_mnist_heldout_is_the_pipeline_eval_split(tmp_path, monkeypatch):
    """Our 1,000 held-out digits are pipelines/mnist_digits.yaml's eval split (a quick build's prefix),
    read from the shards' manifest: shards built with another seed move the held-out split with them."""
    import json

    from twinflow.data import build_pipeline, load_pipeline
    from twinflow.data.local import iter_local_records
    from twinflow.data.splits import split_indices
    from twinflow.eval import datasets

    split = mnist_split_indices()
    assert len(split["eval"]) == 1000 and len(split["train"]) == 9000
    assert not set(split["eval"]) & set(split["train"])
    out = tmp_path / "mnist"
    build_pipeline(
        load_pipeline(REPO / "pipelines" / "mnist_digits.yaml", [f"output={out}", "limit=40"]), progress=False
    )
    from twinflow.eval.datasets import _mnist_arrays

    offsets = np.cumsum([0] + [len(a) for a in _mnist_arrays()])
    ids = [r["id"] for r in iter_local_records(str(out), "eval")]
    index = [int(offsets[int(i.split("-")[1])]) + int(i.split("-")[2]) for i in ids]
    assert len(index) == 40 and set(index) <= set(split["eval"].tolist())
    # the manifest records enough to recompute the whole split (before the quick build's limit)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["eval"]["selection"]["source_records"] == 10_000
    assert np.array_equal(np.sort(split_indices(manifest, "eval")), split["eval"])
    assert index == split_indices(manifest, "eval")[:40].tolist()
    for info in manifest["splits"].values():  # a manifest from before source_records: inferred
        del info["selection"]["source_records"]
    assert np.array_equal(np.sort(split_indices(manifest, "train")), split["train"])
    manifest["pipeline"]["splits"]["train"] = {"count": 9000}
    with pytest.raises(ValueError, match="cannot tell how many records"):
        split_indices(manifest, "eval", "old/manifest.json")
    # shards of a pipeline with another seed: the held-out split is theirs
    other = tmp_path / "seed1"
    cfg = load_pipeline(REPO / "pipelines" / "mnist_digits.yaml", [f"output={other}", "limit=8", "seed=1"])
    build_pipeline(cfg, progress=False)
    monkeypatch.setattr(datasets, "load_pipeline", lambda path: cfg)
    moved = mnist_split_indices()
    assert len(moved["eval"]) == 1000 and not np.array_equal(moved["eval"], split["eval"])


def test_nfe_and_sampler_checks():
    assert check_nfe("4,1,2,2") == [1, 2, 4] and check_nfe([50, 1]) == [1, 50]
    for bad in ["0", "1,x", [1.5], [-2], "", [True], "2000"]:
        with pytest.raises(ValueError, match="NFE"):
            check_nfe(bad)
    assert resolve_sampler("auto", "flow_matching") == "ode" and resolve_sampler("auto", "twinflow") == "few"
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve_sampler("ddim", None)
    assert settings_for(SAMPLER_METHODS["ode"], 50).grid().tolist()[:2] == pytest.approx([1.0, 0.98])
    assert settings_for(SAMPLER_METHODS["few"], 2).grid().tolist() == pytest.approx([0.999, 0.6, 0.0])
    units = plan_units(250, 100, seed=3)
    assert [(u.start, u.stop) for u in units] == [(0, 100), (100, 200), (200, 250)]
    assert len({u.seed for u in units}) == 3 and plan_units(250, 100, seed=3) == units
