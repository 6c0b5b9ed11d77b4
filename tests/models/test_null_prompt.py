"""The CFG null prompt is a model field: the job sets it (or the text encoder's default applies), the
export records it, and training, Serve, eval and tune all build their null condition by encoding it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_generator

from twinflow.export_reader import open_export, shared_text_encoder
from twinflow.models.config import ModelConfig
from twinflow.models.export_writer import save_generator
from twinflow.models.null_prompts import QWEN_NULL_PROMPT
from twinflow.models.text_encoder import TextEncoder, open_text_encoder
from twinflow.train.config import load_job

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a plain grey background"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), atol=0, rtol=0)


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return not torch.equal(a["text_states"].cpu(), b["text_states"].cpu())


def test_defaults_follow_the_text_encoder_and_a_job_can_set_it():
    minilm = ModelConfig(preset="tiny-28g")
    assert minilm.text_encoder_spec["null_prompt"] == ""
    qwen = ModelConfig(pretrained_path="/mnt/models/Qwen-Image", image_size=512, text_encoder="qwen2.5-vl")
    assert qwen.text_encoder_spec["null_prompt"] == QWEN_NULL_PROMPT == "Generate an image."
    assert ModelConfig(preset="tiny-28g", null_prompt=PROMPT).text_encoder_spec["null_prompt"] == PROMPT
    # an explicit empty caption is kept, not replaced by the default
    explicit = qwen.model_copy(update={"null_prompt": ""})
    assert explicit.text_encoder_spec["null_prompt"] == ""


@pytest.mark.parametrize("job", ["qwen_image_lora.yaml", "qwen_image_full.yaml"])
def test_shipped_qwen_recipes_use_the_reference_null_prompt(job):
    assert load_job(REPO / "jobs" / job).model.text_encoder_spec["null_prompt"] == "Generate an image."


def test_encoder_null_condition_is_the_encoding_of_its_null_prompt(text_encoder):
    enc = open_text_encoder({"kind": "minilm", "max_length": 16, "null_prompt": PROMPT})
    _same(enc.null_condition(), text_encoder.encode([PROMPT]))
    assert _differs(enc.null_condition(), text_encoder.encode([""]))
    # a spec without the field (an old export) keeps the empty caption
    _same(open_text_encoder({"kind": "minilm", "max_length": 16}).null_condition(), text_encoder.encode([""]))


def test_export_round_trip_carries_the_null_prompt_and_serve_eval_use_it(tmp_path, text_encoder):
    from twinflow.serve.engine import TextEncoders

    g = make_generator("qwen_image", null_prompt=PROMPT, text_max_length=16)
    out = save_generator(g, tmp_path / "export", {"method": "twinflow"})
    export = open_export(out)
    assert export.meta["text_encoder"]["null_prompt"] == PROMPT
    assert export.meta["model_config"]["null_prompt"] == PROMPT
    assert export.text_encoder_spec["null_prompt"] == PROMPT
    loaded = export.generator()
    assert loaded.text_encoder_spec["null_prompt"] == PROMPT
    want = text_encoder.encode([PROMPT])
    # Serve: the replica's encoders, keyed by the export's spec
    _same(TextEncoders().get(16, export.text_encoder_spec).null_condition(), want)
    # eval (`twinflow.eval.metrics`) and the demo: the process's shared encoder for the model's spec
    _same(shared_text_encoder(16, spec=loaded.text_encoder_spec).null_condition(), want)
    _same(export.text_encoder().null_condition(), want)


def test_an_export_without_the_field_keeps_the_empty_caption(tmp_path, text_encoder):
    from twinflow.serve.engine import TextEncoders

    out = save_generator(make_generator("sana", text_max_length=16), tmp_path / "old", {})
    meta_file = out / "twinflow.json"
    meta = json.loads(meta_file.read_text())
    del meta["text_encoder"]["null_prompt"]
    meta_file.write_text(json.dumps(meta))
    export = open_export(out)
    assert export.text_encoder_spec["null_prompt"] == ""
    _same(TextEncoders().get(16, export.text_encoder_spec).null_condition(), text_encoder.encode([""]))
    meta["text_encoder"]["null_prompt"] = 3
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"twinflow.json: text_encoder.null_prompt must be a string"):
        _ = open_export(out).text_encoder_spec


def _fashion_job(*overrides: str):
    return load_job(REPO / "jobs" / "fashion_twinflow.yaml", ["eval.prompts=[]", *overrides])


def test_training_and_tune_null_condition_of_a_job_that_sets_it(text_encoder):
    from twinflow.train.launcher import encode_conditions
    from twinflow.tune.evaluation import _encoder

    job = _fashion_job(f"model.null_prompt={PROMPT}")
    assert job.model.null_prompt == PROMPT
    length = job.data.text_max_length
    want = TextEncoder(max_length=length).encode([PROMPT])
    null, _ = encode_conditions(job)  # what the driver ships to every training worker
    _same({k: torch.from_numpy(v) for k, v in null.items()}, want)
    _same(_encoder(job).null_condition(), want)  # tune's evaluation task
    # the same job without the field trains on the empty caption
    plain, _ = encode_conditions(_fashion_job())
    _same({k: torch.from_numpy(v) for k, v in plain.items()}, TextEncoder(max_length=length).encode([""]))


def test_qwen_export_defaults_to_the_reference_null_prompt(qwen_pipeline_dir, tmp_path):
    cfg = ModelConfig(
        family="qwen_image",
        pretrained_path=str(qwen_pipeline_dir),
        vae_path=str(qwen_pipeline_dir),
        image_size=32,
        text_encoder="qwen2.5-vl",
        text_max_length=24,
    )
    from twinflow.models.generator import build_generator

    out = save_generator(build_generator(cfg), tmp_path / "qwen", {})
    export = open_export(out)
    assert export.text_encoder_spec["null_prompt"] == "Generate an image."
    enc = export.text_encoder()
    plain = open_text_encoder({"kind": "qwen2.5-vl", "path": str(qwen_pipeline_dir)}, max_length=24)
    _same(enc.null_condition(), plain.encode(["Generate an image."]))
    assert _differs(enc.null_condition(), plain.encode([""]))
