"""Each "does this data fit this job" check of `data.compatibility` fires on a manifest that does not
fit, naming the folder and the field, and passes one that does. (Text states against the model's
encoder: tests/models/test_text_states_check.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from twinflow.data import compatibility, shards
from twinflow.data.config import DataConfig
from twinflow.data.latent_cache import spec_for_job
from twinflow.train.config import JobConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from qwen_pipeline import build_tiny_pipeline


def _manifest(kind="image_text", embedding=None) -> shards.Manifest:
    return shards.Manifest(
        name="d", kind=kind, columns={}, image_format="png", image_mode="RGB", embedding=embedding
    )


def _data(**fields) -> DataConfig:
    return DataConfig(**{"path": "/shards/d", "image_size": 32, "text_max_length": 16, **fields})


def test_an_edit_job_needs_edit_pairs():
    with pytest.raises(
        ValueError,
        match=r"^/shards/d: text_column=instruction needs an edit-pairs dataset \(this one is image_text\)",
    ):
        compatibility.check_edit_pairs(_data(text_column="instruction"), _manifest())
    compatibility.check_edit_pairs(_data(text_column="instruction"), _manifest("edit_pairs"))
    compatibility.check_edit_pairs(_data(), _manifest())


def test_an_embedding_cache_must_have_the_sections_text_column_and_length():
    emb = {"text_column": "caption", "max_length": 16, "dim": 384}
    assert compatibility.check_embedding_cache(_data(), _manifest(embedding=emb)) == emb
    with pytest.raises(
        ValueError, match=r"^/shards/d: this embedding cache has max_length=16 but the config asks for 24"
    ):
        compatibility.check_embedding_cache(_data(text_max_length=24), _manifest(embedding=emb))
    with pytest.raises(
        ValueError, match=r"embedding cache has text_column='caption' .* asks for 'instruction'"
    ):
        compatibility.check_data_section(_data(text_column="instruction"), _manifest("edit_pairs", emb))


def test_a_latent_cache_must_have_the_sections_text_column_length_and_pixel_size():
    emb = {"text_column": "caption", "max_length": 16, "dim": 8, "latent": {"image_size": 32}}
    compatibility.check_data_section(_data(), _manifest(embedding=emb))
    with pytest.raises(
        ValueError, match=r"^/shards/d: this latent cache has image_size=32 but data asks for 64"
    ):
        compatibility.check_data_section(_data(image_size=64), _manifest(embedding=emb))
    with pytest.raises(ValueError, match=r"this latent cache has max_length=16 but data asks for 12"):
        compatibility.check_latent_cache(_data(text_max_length=12), _manifest(embedding=emb))


def test_a_latent_cache_must_come_from_the_jobs_vae_and_text_encoder(tmp_path):
    pipe = str(build_tiny_pipeline(tmp_path / "pipe"))
    job = JobConfig.model_validate(
        {
            "name": "latent",
            "data": {"path": "/shards/cache", "image_size": 32, "text_max_length": 16},
            "model": {
                "family": "qwen_image",
                "preset": "tiny-28g",
                "vae_path": pipe,
                "text_encoder": "qwen2.5-vl",
                "text_encoder_path": pipe,
            },
            "method": {"name": "flow_matching"},
            "train": {"steps": 1, "micro_batch": 2},
        }
    )
    key = spec_for_job(job).key()
    compatibility.check_latent_cache_for_model(job, _manifest(embedding={"latent": key}))
    compatibility.check_latent_cache_for_model(job, _manifest())  # not a latent cache: nothing to check
    other_vae = {**key, "vae_config_sha256": "0" * 64}
    with pytest.raises(
        ValueError,
        match=r"^/shards/cache: this latent cache was made with vae_config_sha256='0+' but the job's model needs",
    ):
        compatibility.check_latent_cache_for_model(job, _manifest(embedding={"latent": other_vae}))
    with pytest.raises(ValueError, match=r"made with crop='top' .* rebuild it with `twinflow data cache"):
        compatibility.check_latent_cache_for_model(
            job, _manifest(embedding={"latent": {**key, "crop": "top"}})
        )


def test_unreadable_data_is_left_to_the_readers(tmp_path):
    assert compatibility.read_data_manifest(_data(path=str(tmp_path / "nope"))) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert compatibility.read_data_manifest(DataConfig(path=str(tmp_path))) is None
