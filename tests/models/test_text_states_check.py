"""A Qwen2.5-VL model given data that carries another encoder's text states (or another width) is
refused when the job is loaded, before Ray starts, with both encoders named (`data.compatibility.check_text_states`)."""

from __future__ import annotations

import pytest
import yaml
from qwen_pipeline import TEXT_WIDTH

from twinflow.config import ConfigError
from twinflow.data import compatibility, shards
from twinflow.train.config import load_job


def check_text_states(job):
    """The check on the manifest the driver reads once (`data.compatibility.read_data_manifest`)."""
    compatibility.check_text_states(job, compatibility.read_data_manifest(job.data))


def _data(root, embedding=None):
    manifest = shards.Manifest(
        name="d", kind="image_text", columns={}, image_format="png", image_mode="RGB", embedding=embedding
    )
    root.mkdir(parents=True)
    shards.write_manifest(str(root), manifest)
    return root


def _job_yaml(tmp_path, data, pipe, **data_fields):
    job = {
        "name": "qwen_mismatch",
        "data": {"path": str(data), "image_size": 32, **data_fields},
        "model": {
            "family": "qwen_image",
            "preset": "tiny-28g",
            "text_encoder": "qwen2.5-vl",
            "text_encoder_path": str(pipe),
        },
        "method": {"name": "flow_matching"},
        "train": {"steps": 1, "micro_batch": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _latent_cache(tmp_path, name, kind, path, dim):
    return _data(tmp_path / name, {"dim": dim, "latent": {"text_encoder": kind, "text_encoder_path": path}})


def test_twinflow_train_refuses_minilm_states_for_a_qwen_model_before_ray(
    tmp_path, qwen_pipeline_dir, monkeypatch, capsys
):
    import twinflow.train.launcher as launcher
    from twinflow.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launcher, "ensure_ray", no_ray)
    cache = _latent_cache(tmp_path, "minilm_cache", "minilm", None, 384)
    job = _job_yaml(tmp_path, cache, qwen_pipeline_dir)
    assert main(["train", str(job)]) == 2
    err = capsys.readouterr().err
    assert str(job) in err and "latent cache" in err
    assert "minilm (384-d)" in err and f"qwen2.5-vl ({qwen_pipeline_dir}, {TEXT_WIDTH}-d)" in err
    assert not (tmp_path / "runs" / "qwen_mismatch").exists()  # nothing was prepared either


def test_text_states_of_the_same_encoder_pass_and_other_widths_or_encoders_fail(tmp_path, qwen_pipeline_dir):
    pipe = str(qwen_pipeline_dir)
    same = _latent_cache(tmp_path, "same", "qwen2.5-vl", pipe, TEXT_WIDTH)
    check_text_states(load_job(_job_yaml(tmp_path, same, pipe)))
    wider = _latent_cache(tmp_path, "wider", "qwen2.5-vl", "/elsewhere/Qwen-Image", 3584)
    with pytest.raises(ConfigError, match=rf"3584-d.*{TEXT_WIDTH}-d"):
        check_text_states(load_job(_job_yaml(tmp_path, wider, pipe)))
    # an embedding cache (`twinflow data embed`) made with MiniLM
    embedded = _data(tmp_path / "embedded", {"dim": 384, "encoder_dir": "default", "max_length": 32})
    with pytest.raises(ConfigError, match=r"embedding cache\) gives minilm \(384-d\)"):
        check_text_states(load_job(_job_yaml(tmp_path, embedded, pipe)))
    # plain shards: captions encoded on the fly by data.text_encoder_dir (unset: MiniLM)
    plain = _data(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"data.text_encoder_dir \(unset.*set data.text_encoder_dir"):
        check_text_states(load_job(_job_yaml(tmp_path, plain, pipe)))
    check_text_states(load_job(_job_yaml(tmp_path, plain, pipe, text_encoder_dir=pipe)))
    # unreadable data is left to the data checks; unconditional data carries no text states
    check_text_states(load_job(_job_yaml(tmp_path, tmp_path / "missing", pipe)))
    check_text_states(load_job(_job_yaml(tmp_path, plain, pipe, embed_text=False)))
