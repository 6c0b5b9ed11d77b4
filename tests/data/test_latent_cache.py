"""`twinflow data cache`: latent + text-state shards made by a Ray actor pool with the model's own VAE
and text encoder (a tiny real-class Qwen-Image pipeline), read back by training without either."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from qwen_pipeline import build_tiny_pipeline

from twinflow.data import compatibility
from twinflow.data.latent_cache import CacheSpec, build_latent_cache


def check_cache_for_model(job):
    """The check on the manifest the driver reads once (`data.compatibility.read_data_manifest`)."""
    compatibility.check_latent_cache_for_model(job, compatibility.read_data_manifest(job.data))


SIZE, LENGTH = 28, 16


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("qwen") / "pipe")


def _spec(pipe: Path) -> CacheSpec:
    return CacheSpec(str(pipe), "qwen2.5-vl", str(pipe), LENGTH, SIZE)


@pytest.fixture(scope="module")
def cache(ray_cluster, fashion_small, pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "cache"
    build_latent_cache(str(fashion_small), _spec(pipeline_dir), str(out), actors=1, batch_size=32)
    return out


def _job(cache: Path, pipe: Path, out: Path, *extra: str):
    from twinflow.train.config import load_job

    return load_job(
        Path(__file__).resolve().parents[2] / "jobs" / "fashion_base_fm.yaml",
        [
            "name=latent_cache",
            f"data.path={cache}",
            f"data.image_size={SIZE}",
            f"data.text_max_length={LENGTH}",
            f"data.text_encoder_dir={pipe}",
            "data.shuffle_buffer=0",
            "model.preset=null",
            f"model.pretrained_path={pipe}",
            f"model.vae_path={pipe}",
            "model.text_encoder=qwen2.5-vl",
            f"model.image_size={SIZE}",
            f"model.text_max_length={LENGTH}",
            "cluster.num_workers=1",
            "train.micro_batch=8",
            "train.steps=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "eval.prompts=[]",
            f"output.dir={out}",
            "output.tensorboard=false",
            *extra,
        ],
    )


@pytest.mark.integration
def test_cached_batches_equal_in_loop_encoding(cache, fashion_small, pipeline_dir):
    from twinflow.data.config import DataConfig
    from twinflow.data.decode import DecodeSpec, decode_rows
    from twinflow.data.latent_stream import latent_train_dataset
    from twinflow.data.shards import iter_shard_tables, read_manifest
    from twinflow.models.text_encoder import open_text_encoder
    from twinflow.models.vae import LatentCodec

    manifest = json.loads((cache / "manifest.json").read_text())
    latent = manifest["embedding"]["latent"]
    assert latent["vae_path"] == str(pipeline_dir) and latent["shape"] == [4, SIZE // 2, SIZE // 2]
    source = read_manifest(str(fashion_small))
    assert [s["sha256"] for s in latent["source_shards"]] == [s.sha256 for s in source.split("train").shards]

    cfg = DataConfig(
        path=str(cache), image_size=SIZE, text_max_length=LENGTH, shuffle="none", shuffle_buffer=0
    )
    batch = latent_train_dataset(cfg).take_batch(12, batch_format="numpy")
    ids = list(batch["id"])

    rows = {}
    for _, table in iter_shard_tables(str(fashion_small), source.split("train").shards):
        arrays, bad = decode_rows(table.to_pydict(), DecodeSpec(image_size=SIZE, channels=3))
        assert not bad
        rows.update({rid: (arrays["image"][i], arrays["caption"][i]) for i, rid in enumerate(arrays["id"])})
    images = torch.from_numpy(np.stack([rows[i][0] for i in ids]))
    codec = LatentCodec.from_pretrained(pipeline_dir)
    encoder = open_text_encoder({"kind": "qwen2.5-vl", "path": str(pipeline_dir)}, LENGTH)
    enc = encoder.encode([rows[i][1] for i in ids])
    np.testing.assert_allclose(batch["image"], codec.encode(images).numpy(), atol=1e-5)
    np.testing.assert_allclose(batch["text_states"], enc["text_states"].numpy(), atol=1e-5)
    np.testing.assert_array_equal(batch["text_mask"], enc["text_mask"].numpy())


@pytest.mark.integration
def test_a_job_with_another_vae_is_refused(cache, pipeline_dir, tmp_path):
    check_cache_for_model(_job(cache, pipeline_dir, tmp_path))  # the model that made it: accepted
    other = tmp_path / "other"
    shutil.copytree(pipeline_dir, other)
    cfg = json.loads((other / "vae" / "config.json").read_text())
    cfg["latents_std"] = [2 * s for s in cfg["latents_std"]]
    (other / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vae_config_sha256"):
        check_cache_for_model(_job(cache, other, tmp_path, f"model.vae_path={other}"))
    with pytest.raises(ValueError, match="max_length"):
        check_cache_for_model(_job(cache, pipeline_dir, tmp_path, "data.text_max_length=12"))


@pytest.mark.integration
def test_training_runs_on_cached_shards_without_the_vae(cache, pipeline_dir, tmp_path, monkeypatch):
    from twinflow.models import vae
    from twinflow.train.launcher import run_job

    def no_vae(*args, **kwargs):
        raise AssertionError("training on a latent cache loaded the VAE")

    monkeypatch.setattr(vae.LatentCodec, "from_pretrained", no_vae)
    result = run_job(_job(cache, pipeline_dir, tmp_path))
    assert result.ok
    lines = [
        json.loads(x) for x in (tmp_path / "latent_cache" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in lines if "total" in r] == [1, 2]


@pytest.mark.integration
def test_cache_on_s3_streams_back(ray_cluster, fashion_small, pipeline_dir, bucket, s3_server):
    from twinflow.data.config import DataConfig
    from twinflow.data.latent_stream import latent_train_dataset

    uri = f"s3://{bucket}/cache"
    m = build_latent_cache(str(fashion_small), _spec(pipeline_dir), uri, endpoint=s3_server, batch_size=48)
    cfg = DataConfig(
        path=uri, s3_endpoint=s3_server, image_size=SIZE, text_max_length=LENGTH, shuffle_buffer=0
    )
    batch = latent_train_dataset(cfg).take_batch(8, batch_format="numpy")
    assert m.splits["train"].count == 96 and batch["image"].shape == (8, 4, SIZE // 2, SIZE // 2)
    assert batch["text_states"].shape[1:] == (LENGTH, 32)


def test_spec_from_the_shipped_20b_job():
    from twinflow.data.latent_cache import spec_for_model

    spec = spec_for_model(str(Path(__file__).resolve().parents[2] / "jobs" / "qwen_image_lora.yaml"))
    assert (spec.vae_path, spec.text_encoder, spec.text_encoder_path) == (
        "/mnt/models/Qwen-Image",
        "qwen2.5-vl",
        "/mnt/models/Qwen-Image",
    )
    assert (spec.image_size, spec.max_length, spec.text_column) == (512, 256, "caption")
    with pytest.raises(FileNotFoundError, match="neither a job YAML nor an export"):
        spec_for_model(str(Path(__file__).parent))
