"""The edit study's own logic (benchmarks/edit_study.py): which geometric edit a pair holds, the split
of an edit into patch moves and in-patch pixel moves that the probe arms feed, and the results file
that a rerun resumes from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import edit_study as es

from twinflow.train.inprocess import MemoryData


def _images(n: int = 6, size: int = 28) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_geometric_kind_names_each_transform_and_nothing_else():
    x = _images(len(es.GEOMETRIC))
    targets = torch.stack([fn(x[i : i + 1], (-2, -1))[0] for i, fn in enumerate(es.GEOMETRIC.values())])
    assert es.geometric_kind(x, targets).tolist() == list(range(len(es.GEOMETRIC)))
    others = torch.cat([-x[:2], x[2:4].roll(4, -1), x[4:]])  # invert, shift, unchanged
    assert es.geometric_kind(x, others).tolist() == [-1] * len(x)


@pytest.mark.parametrize("kind", range(len(es.GEOMETRIC)))
def test_patch_moves_then_pixel_moves_are_the_edit(kind):
    """Moving the 4x4 patches and transforming the pixels inside them gives the whole edit; neither
    part alone does (on a random image), so each probe arm leaves the model exactly one part."""
    x = _images(2)
    k = torch.full((2,), kind)
    full = list(es.GEOMETRIC.values())[kind](x, (-2, -1))
    blocks, pixels = es.route(x, k, "blocks", 4), es.route(x, k, "pixels", 4)
    assert torch.equal(es.route(blocks, k, "pixels", 4), full)
    assert torch.equal(es.route(pixels, k, "blocks", 4), full)
    assert not torch.equal(blocks, full) and not torch.equal(pixels, full)
    # "blocks" keeps every 4x4 patch whole (same set of patches); "pixels" keeps each patch's pixels
    # in place on the grid (same values per grid position)
    patches = lambda t: es._blocks(t, 4).reshape(-1, 16)  # noqa: E731
    assert torch.equal(torch.unique(patches(blocks), dim=0), torch.unique(patches(x), dim=0))
    assert torch.equal(patches(pixels).sort(1).values, patches(x).sort(1).values)
    assert torch.equal(es.route(x, torch.full((2,), -1), "blocks", 4), x)  # not geometric: untouched
    with pytest.raises(ValueError, match="part"):
        es.route(x, k, "tokens", 4)


def test_probe_arm_data_keeps_the_geometric_rows_with_their_routed_sources():
    src = _images(4)
    img = torch.stack([src[0].flip(-1), -src[1], src[2].rot90(1, (-2, -1)), src[3].roll(4, -1)])
    data = MemoryData(
        images=img,
        labels=torch.arange(4),
        caption_ids=torch.arange(4),
        captions=["flip", "invert", "rotate", "shift"],
        states=torch.zeros(4, 2, 3),
        masks=torch.ones(4, 2),
        refs=src,
    )
    given = es.probe_arm_data(data, "given", 4)
    assert given.labels.tolist() == [0, 2] and torch.equal(given.refs, src[[0, 2]])
    placed = es.probe_arm_data(data, "blocks_placed", 4)
    assert torch.equal(es.route(placed.refs, torch.tensor([0, 2]), "pixels", 4), img[[0, 2]])
    _, cond = placed.rows(torch.tensor([1]))
    assert torch.equal(cond["ref_image"], placed.refs[1:2])


def test_results_file_resumes_finished_entries_and_remeasures_changed_ones(tmp_path):
    path = tmp_path / "study.json"
    keys = {"a": es.settings_key(name="a", steps=10), "b": es.settings_key(name="b", steps=10)}
    assert es.pending({}, ["a", "b"], keys) == ["a", "b"]
    es.record(path, "a", {"settings": keys["a"], "x": 1}, {"pairs": 8})
    saved = json.loads(path.read_text())
    assert saved["pairs"] == 8 and saved["entries"]["a"]["x"] == 1
    assert es.pending(saved, ["a", "b"], keys) == ["b"]
    changed = {**keys, "a": es.settings_key(name="a", steps=20)}
    assert es.pending(saved, ["b", "a"], changed) == ["b", "a"]
    es.record(path, "b", {"settings": keys["b"]}, {"pairs": 8})
    assert set(json.loads(path.read_text())["entries"]) == {"a", "b"}  # earlier entries kept


def _metrics(psnr: float, kept: dict[str, float]) -> dict:
    return {
        "edit_psnr": psnr,
        "by_op": {
            op: {"edit_psnr": psnr + i, "edit_class_kept": v} for i, (op, v) in enumerate(kept.items())
        },
    }


def test_verdict_checks_every_op_and_the_psnr_against_fm50():
    fm50 = _metrics(17.0, {"flip": 0.5, "rotate": 0.4})
    good = {"eval": {"twinflow": {"2": _metrics(18.0, {"flip": 0.95, "rotate": 0.9})}, "fm": {"50": fm50}}}
    assert es.verdict(good) == {
        "every_op_class_90": True,
        "ops_below_90": {},
        "psnr_above_fm50": True,
        "ops_psnr_not_above_fm50": [],
    }
    bad = {"eval": {"twinflow": {"2": _metrics(16.5, {"flip": 0.95, "rotate": 0.89})}, "fm": {"50": fm50}}}
    v = es.verdict(bad)
    assert v["ops_below_90"] == {"rotate": 0.89} and not v["every_op_class_90"]
    assert not v["psnr_above_fm50"] and v["ops_psnr_not_above_fm50"] == ["flip", "rotate"]
