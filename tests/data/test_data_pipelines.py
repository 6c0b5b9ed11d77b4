"""Pipeline YAMLs, shard building from the real offline data, splits, edits and the manifest (no Ray)."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from twinflow.config import ConfigError
from twinflow.data import BadDataError, build_pipeline, load_pipeline
from twinflow.data.edits import Edit, apply_edit
from twinflow.data.shards import read_manifest, verify_checksums

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"

YAMLS = sorted(PIPELINES.glob("*.yaml"))
FASHION_NOUNS = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def rows(root: Path, split: str) -> list[dict]:
    m = read_manifest(str(root))
    out = []
    for shard in m.splits[split].shards:
        out += pq.read_table(root / shard.path).to_pylist()
    return out


def pixels(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def export_folder(tmp_path: Path, n: int = 6) -> Path:
    """A user-style folder of real images (Fashion-MNIST items as PNG) with .txt sidecars."""
    from twinflow.data.config import FashionMnistSource
    from twinflow.data.sources.fashion_mnist import FashionMnist

    src = FashionMnist(FashionMnistSource(type="fashion_mnist"), seed=0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        item = src.item("test", i)
        path = folder / ("sub" if i % 2 else "") / f"item{i}.png"
        item.image.convert("RGB").resize((40, 40)).save(path)
        path.with_suffix(".txt").write_text(item.caption + "\n")
    return folder


def test_every_pipeline_yaml_loads_and_names_its_command():
    assert len(YAMLS) >= 7
    for path in YAMLS:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# twinflow data build pipelines/{path.name}"), (path, first)
        cfg = load_pipeline(path)
        assert cfg.name == path.stem
        assert cfg.output.startswith("data/"), "default outputs go under the git-ignored data/"


def test_set_overrides_and_typos_are_errors():
    cfg = load_pipeline(PIPELINES / "emoji.yaml", ["limit=5", "image_size=32", "splits.eval.fraction=0.2"])
    assert (cfg.limit, cfg.image_size, cfg.splits["eval"].fraction) == (5, 32, 0.2)
    with pytest.raises(ConfigError, match="shard_sise: unknown field"):
        load_pipeline(PIPELINES / "emoji.yaml", ["shard_sise=3"])
    with pytest.raises(ConfigError, match="count or fraction, not both"):
        load_pipeline(PIPELINES / "emoji.yaml", ["splits.eval.count=3"])
    with pytest.raises(ConfigError, match="per_image=7"):
        load_pipeline(PIPELINES / "mnist_edits.yaml", ["edits.per_image=7"])


@pytest.mark.parametrize("yaml_path", [p for p in YAMLS if p.stem != "image_folder"], ids=lambda p: p.stem)
def test_each_shipped_pipeline_builds_a_small_slice(yaml_path, tmp_path):
    cfg = load_pipeline(yaml_path, [f"output={tmp_path}", "limit=12", "shard_size=10"])
    result = build_pipeline(cfg, progress=False)
    m = read_manifest(str(tmp_path))
    per_image = cfg.edits.per_image if cfg.edits else 1
    assert set(m.splits) == set(cfg.splits)
    for split in m.splits.values():
        assert split.count == 12 * per_image
        assert [s.count for s in split.shards] == [10] * (split.count // 10) + (
            [split.count % 10] if split.count % 10 else []
        )
        assert split.selection["limit"] == 12
    assert verify_checksums(str(tmp_path), m) == {}
    assert result.bad.count == 0 and m.bad_records["bad"] == 0
    assert m.kind == cfg.kind and m.schema_version == 1 and m.source["type"] == cfg.source.type
    train = rows(tmp_path, "train")
    ids = {r["id"] for r in train}
    assert len(ids) == len(train)
    assert not ids & {r["id"] for r in rows(tmp_path, next(s for s in m.splits if s != "train"))}
    for r in train:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == cfg.image_format.upper() and img.mode == m.image_mode
        assert list(img.size) == m.image_size
        assert r["caption"].strip()
        if cfg.edits:
            assert r["instruction"].strip() and json.loads(r["edit"])["op"] in cfg.edits.ops


def test_fashion_captions_match_labels_and_eval_comes_from_test(fashion_small):
    m = read_manifest(str(fashion_small))
    assert m.splits["train"].selection["source_split"] == "train"
    assert m.splits["eval"].selection["source_split"] == "test"
    templates = {re.sub(r"\{a_name\}", "(a|an) (.+)", t) for t in m.source["caption_templates"]}
    used = set()
    train, held_out = rows(fashion_small, "train"), rows(fashion_small, "eval")
    assert (len(train), len(held_out)) == (96, 32)
    assert all(r["id"].startswith("fmnist-train-") for r in train)
    assert all(r["id"].startswith("fmnist-test-") for r in held_out)
    for r in train + held_out:
        matches = [re.fullmatch(t, r["caption"]) for t in templates]
        hit = next(mm for mm in matches if mm)
        assert hit.group(2) == FASHION_NOUNS[r["label"]]
        used.add(hit.re.pattern)
    assert len(used) >= 3, "several phrasing templates are in use"


def test_full_source_sizes():
    from twinflow.data.config import EmojiSource, FashionMnistSource, MnistDigitsSource
    from twinflow.data.sources import make_source

    assert make_source(FashionMnistSource(type="fashion_mnist"), 0).splits() == {
        "train": 60000,
        "test": 10000,
    }
    assert make_source(MnistDigitsSource(type="mnist_digits"), 0).splits() == {"all": 10000}
    assert make_source(EmojiSource(type="emoji"), 0).splits()["all"] > 1000


def test_mnist_captions_spell_the_digit(tmp_path):
    cfg = load_pipeline(PIPELINES / "mnist_digits.yaml", [f"output={tmp_path}", "limit=30"])
    build_pipeline(cfg, progress=False)
    train = rows(tmp_path, "train")
    assert {r["caption"] for r in train} <= {f"a handwritten digit {w}" for w in WORDS}
    for r in train:
        assert r["caption"] == f"a handwritten digit {WORDS[r['label']]}"
        assert r["id"].startswith(f"mnist-{r['label']}-")
        assert pixels(r["image"]).max() > 200, "real ink, not an empty image"


def test_mnist_digits_dir_missing_is_a_clear_error(monkeypatch, tmp_path):
    from twinflow.data.sources.mnist_digits import find_digits_dir

    with pytest.raises(FileNotFoundError, match="run scripts/setup.sh"):
        find_digits_dir(str(tmp_path))
    monkeypatch.setenv("TWINFLOW_MNIST_DIR", str(tmp_path / "nowhere"))
    assert find_digits_dir().name == "digits"  # falls back to the repo's .cache


def test_emoji_captions_are_unicode_names_and_rgb(tmp_path):
    cfg = load_pipeline(PIPELINES / "emoji.yaml", [f"output={tmp_path}", "limit=10"])
    build_pipeline(cfg, progress=False)
    for r in rows(tmp_path, "train"):
        assert r["caption"] == unicodedata.name(chr(r["label"])).lower()
        arr = pixels(r["image"])
        assert arr.shape == (64, 64, 3)
        assert (arr[0, 0] == 255).all(), "white background"
        assert (np.abs(arr.astype(int) - 255).sum(-1) > 30).mean() > 0.1, "a glyph was drawn"


def test_splits_by_fraction_are_disjoint_and_reproducible(tmp_path):
    over = ["splits.eval.fraction=0.25", "limit=40"]
    a = build_pipeline(
        load_pipeline(PIPELINES / "emoji.yaml", [f"output={tmp_path / 'a'}", *over]), progress=False
    )
    b = build_pipeline(
        load_pipeline(PIPELINES / "emoji.yaml", [f"output={tmp_path / 'b'}", *over]), progress=False
    )
    sel = a.manifest.splits["eval"].selection
    assert sel["slice"] == round(0.25 * a.manifest.source["code_points"])
    assert a.manifest.splits["train"].selection["offset"] == sel["slice"]
    for split in ("train", "eval"):
        assert [s.sha256 for s in a.manifest.splits[split].shards] == [
            s.sha256 for s in b.manifest.splits[split].shards
        ], "same seed, same bytes"
    other = build_pipeline(
        load_pipeline(PIPELINES / "emoji.yaml", [f"output={tmp_path / 'c'}", "seed=1", *over]), progress=False
    )
    assert {r["id"] for r in rows(tmp_path / "a", "train")} != {
        r["id"] for r in rows(tmp_path / "c", "train")
    }
    assert other.manifest.total == a.manifest.total


def test_split_sizes_beyond_the_source_are_refused(tmp_path):
    cfg = load_pipeline(PIPELINES / "mnist_digits.yaml", [f"output={tmp_path}", "splits.eval.count=20000"])
    with pytest.raises(ValueError, match="ask for 20000 records"):
        build_pipeline(cfg, progress=False)
    cfg = load_pipeline(
        PIPELINES / "fashion_mnist.yaml", [f"output={tmp_path}", "splits.eval.source_split=val"]
    )
    with pytest.raises(ValueError, match="source_split 'val' does not exist"):
        build_pipeline(cfg, progress=False)


def test_edit_pairs_targets_are_exact_edits_of_the_source(tmp_path):
    cfg = load_pipeline(PIPELINES / "mnist_edits.yaml", [f"output={tmp_path}", "limit=25"])
    build_pipeline(cfg, progress=False)
    seen = set()
    for r in rows(tmp_path, "train"):
        spec = json.loads(r["edit"])
        op = spec.pop("op")
        seen.add(op)
        source = Image.open(io.BytesIO(r["source_image"]))
        target = apply_edit(source, Edit(op, spec), cfg.edits.stroke_radius)
        assert np.array_equal(np.array(target), pixels(r["image"])), r["id"]
        assert not np.array_equal(pixels(r["source_image"]), pixels(r["image"])) or op == "flip"
        assert r["caption"] == f"a handwritten digit {WORDS[r['label']]}"
        text = r["instruction"]
        if op == "rotate":
            assert {90: "90 degrees clockwise", 180: "180 degrees", 270: "90 degrees counterclockwise"}[
                spec["degrees"]
            ] in text
        elif op == "shift":
            assert f"{spec['pixels']} pixels" in text and spec["direction"] in text
        elif op == "flip":
            assert spec["axis"][:-2] in text  # horizontally / vertically
    assert len(seen) >= 5, f"ops used: {seen}"


def test_edit_ops_do_what_the_instruction_says():
    arr = np.zeros((6, 6), np.uint8)
    arr[1, 1:4] = 200  # a short bright bar near the top-left
    im = Image.fromarray(arr, "L")
    rot = np.array(apply_edit(im, Edit("rotate", {"degrees": 90})))
    assert np.array_equal(rot, np.rot90(arr, k=-1)), "90 degrees clockwise"
    assert np.array_equal(np.array(apply_edit(im, Edit("flip", {"axis": "horizontal"}))), arr[:, ::-1])
    assert np.array_equal(np.array(apply_edit(im, Edit("invert"))), 255 - arr)
    right = np.array(apply_edit(im, Edit("shift", {"direction": "right", "pixels": 2})))
    assert np.array_equal(right[:, 2:], arr[:, :-2]) and (right[:, :2] == 0).all()
    thick = np.array(apply_edit(im, Edit("thicker")))
    assert (thick > 0).sum() > (arr > 0).sum() and (thick[arr > 0] == 200).all()
    assert (np.array(apply_edit(Image.fromarray(thick, "L"), Edit("thinner"))) > 0).sum() < (thick > 0).sum()
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    green = np.array(apply_edit(red, Edit("hue_shift", {"degrees": 120})))[0, 0]
    assert green[1] > 240 and green[0] < 15 and green[2] < 15
    gray = np.array(apply_edit(red, Edit("grayscale")))[0, 0]
    assert gray[0] == gray[1] == gray[2]
    white_bg = np.full((6, 6, 3), 255, np.uint8)
    white_bg[2, 2] = (0, 0, 255)
    up = np.array(apply_edit(Image.fromarray(white_bg), Edit("shift", {"direction": "up", "pixels": 1})))
    assert (up[5] == 255).all() and tuple(up[1, 2]) == (0, 0, 255), "uncovered space takes the background"


def test_incompatible_edit_ops_fail_before_building(tmp_path):
    cfg = load_pipeline(
        PIPELINES / "mnist_edits.yaml", [f"output={tmp_path}", "edits.ops=[grayscale, rotate]"]
    )
    with pytest.raises(ValueError, match=r"\['grayscale'\] need a RGB source"):
        build_pipeline(cfg, progress=False)
    cfg = load_pipeline(
        PIPELINES / "emoji_edits.yaml",
        [f"output={tmp_path}", "edits.instructions={rotate: ['spin {angle}']}"],
    )
    with pytest.raises(ValueError, match="unknown field"):
        build_pipeline(cfg, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_user_folder_with_sidecars(tmp_path):
    folder = export_folder(tmp_path)
    cfg = load_pipeline(
        PIPELINES / "image_folder.yaml",
        [f"source.path={folder}", f"output={tmp_path / 'out'}", "splits.eval.fraction=0.34", "image_size=32"],
    )
    build_pipeline(cfg, progress=False)
    got = rows(tmp_path / "out", "train") + rows(tmp_path / "out", "eval")
    assert len(got) == 6
    captions = {r["id"]: r["caption"] for r in got}
    assert captions["img-item0"] == (folder / "item0.txt").read_text().strip()
    assert captions["img-sub_item1"] == (folder / "sub" / "item1.txt").read_text().strip()
    assert all(Image.open(io.BytesIO(r["image"])).size == (32, 32) for r in got)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_user_index_and_bad_files_are_skipped_and_counted(tmp_path, fmt):
    folder = export_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    entries = [
        ("item0.png", "a first caption"),
        ("sub/item1.png", "a second caption"),
        ("broken.png", "an undecodable image"),
        ("item2.png", "  "),
        ("gone.png", "a missing file"),
    ]
    index = folder / f"index.{fmt}"
    if fmt == "jsonl":
        index.write_text("\n".join(json.dumps({"path": p, "caption": c}) for p, c in entries) + "\n")
    else:
        index.write_text("path,caption\n" + "".join(f"{p},{c}\n" for p, c in entries))
    over = [
        f"source.index={index}",
        "source.path=null",
        f"output={tmp_path / 'out'}",
        "splits.eval={count: 1}",
    ]
    with pytest.raises(
        BadDataError, match=r"too many bad source records: 1 of 5 expected \(max_bad_fraction=0.05 allows 0\)"
    ):
        build_pipeline(load_pipeline(PIPELINES / "image_folder.yaml", over), progress=False)
    result = build_pipeline(
        load_pipeline(PIPELINES / "image_folder.yaml", over + ["max_bad_fraction=0.6"]), progress=False
    )
    by = result.manifest.bad_records["by_reason"]
    assert by["decode_error"]["ids"] == ["img-broken"]
    assert by["empty_caption"]["ids"] == ["img-item2"]
    assert by["missing_file"]["ids"] == ["img-gone"]
    assert result.manifest.total == 2 and result.bad.count == 3


def test_rebuild_replaces_the_previous_shards(tmp_path):
    build_pipeline(
        load_pipeline(PIPELINES / "mnist_digits.yaml", [f"output={tmp_path}", "limit=30", "shard_size=10"]),
        progress=False,
    )
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 3
    build_pipeline(
        load_pipeline(PIPELINES / "mnist_digits.yaml", [f"output={tmp_path}", "limit=30"]), progress=False
    )
    assert len(list((tmp_path / "train").glob("*.parquet"))) == 1


def test_checksum_verification_catches_a_changed_shard(fashion_small, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fashion_small, copy)
    m = read_manifest(str(copy))
    shard = copy / m.splits["train"].shards[1].path
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    (copy / m.splits["eval"].shards[0].path).unlink()
    problems = verify_checksums(str(copy), m)
    assert set(problems) == {m.splits["train"].shards[1].path, m.splits["eval"].shards[0].path}
    assert problems[m.splits["eval"].shards[0].path] == "missing"
