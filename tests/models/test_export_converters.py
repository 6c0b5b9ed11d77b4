"""Exports other tools load, loaded back by those tools (diffusers' QwenImagePipeline on a tiny pipeline)."""

import json

import pytest
import torch
from qwen_pipeline import CAPTIONS, LATENT_CHANNELS
from safetensors import safe_open

from twinflow.models.config import ModelConfig
from twinflow.models.generator import build_generator
from twinflow.models.text_encoder import open_text_encoder


def _model(path, **kw):
    cfg = ModelConfig(
        family="qwen_image",
        pretrained_path=str(path),
        vae_path=str(path),
        image_size=32,
        text_encoder="qwen2.5-vl",
        text_max_length=16,
        **kw,
    )
    return build_generator(cfg)


def _train(g, cond, steps=2):
    torch.manual_seed(1)
    x, t, r = torch.randn(2, *g.sample_shape), torch.tensor([0.9, 0.5]), torch.tensor([0.2, 0.5])
    opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        g(x, t, r, cond).square().mean().backward()
        opt.step()
    return g.eval()


@pytest.fixture(scope="module")
def encoder(qwen_pipeline_dir):
    return open_text_encoder({"kind": "qwen2.5-vl", "path": str(qwen_pipeline_dir)}, max_length=16)


def _pipe(path):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(str(path), local_files_only=True)


def _velocity_via(pipe, x, t, cond):
    """The pipeline's transformer on our state, in our (B, C, H, W) layout."""
    b = x.shape[0]
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=pipe._pack_latents(x, b, LATENT_CHANNELS, 16, 16),
            timestep=t,
            encoder_hidden_states=cond["text_states"],
            encoder_hidden_states_mask=cond["text_mask"],
            img_shapes=[[(1, 8, 8)]] * b,
            return_dict=False,
        )[0]
    return pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor).squeeze(2)


def test_diffusers_pipeline_export_runs_our_multistep_sampler(qwen_pipeline_dir, encoder, tmp_path):
    from twinflow.method.sampler import SamplerSettings, sample
    from twinflow.models.export_converters import save_diffusers_pipeline
    from twinflow.models.export_loader import load_generator

    cond = encoder.encode(CAPTIONS[:2])
    g = _train(_model(qwen_pipeline_dir, e2_init="random"), cond)
    out = save_diffusers_pipeline(g, tmp_path / "pipe", {"job": "t"})
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "twin_e2" in k]  # diffusers names only; E2 lies beside
    pipe = _pipe(out)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"

    noise = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = sample(g, noise, cond, settings=SamplerSettings(nfe=4, style="mul", rho=0.0, g0=0.0, g1=0.0))
    theirs = pipe(
        prompt=CAPTIONS[:2],
        height=32,
        width=32,
        num_inference_steps=4,
        latents=pipe._pack_latents(noise, 2, LATENT_CHANNELS, 16, 16),
        true_cfg_scale=1.0,
        output_type="latent",
    ).images
    theirs = pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor).squeeze(2)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    # The same directory is a full TwinFlow export: E2 (which diffusers ignores) comes back exactly.
    back, meta = load_generator(out)
    assert meta["job"] == "t" and back.text_encoder_spec["path"] == str(out)
    x, t, r = torch.randn(2, *g.sample_shape), torch.tensor([1.0, 0.6]), torch.tensor([0.0, 0.3])
    with torch.no_grad():
        assert torch.equal(back(x, t, r, cond), g(x, t, r, cond))
        assert not torch.equal(back(x, t, r, cond), back(x, t, t, cond))
    # Serve and eval open it through twinflow.export_reader: they get its Qwen2.5-VL, not MiniLM.
    from twinflow.export_reader import open_export
    from twinflow.serve.engine import TextEncoders

    export = open_export(out)
    assert export.text_encoder().kind == "qwen2.5-vl" and export.text_encoder_spec["path"] == str(out)
    served = TextEncoders(cache_size=8).encode(CAPTIONS[:2], export.text_max_length, export.text_encoder_spec)
    assert torch.equal(served["text_states"], cond["text_states"])


def test_lora_exports_load_with_load_lora_weights(qwen_pipeline_dir, encoder, tmp_path):
    from twinflow.models.export_converters import COMFY_FILE, LORA_FILE, adapter_of, convert_export
    from twinflow.models.export_writer import save_generator

    cond = encoder.encode(CAPTIONS[1:3])
    g = _train(_model(qwen_pipeline_dir, lora={"rank": 4, "alpha": 8}), cond)
    save_generator(g, tmp_path / "native", {})
    written = convert_export(tmp_path / "native", ["diffusers_lora", "comfyui_lora"], tmp_path / "out")
    assert written["diffusers_lora"].name == LORA_FILE and written["comfyui_lora"].name == COMFY_FILE
    with safe_open(str(written["comfyui_lora"]), "pt") as fh:
        keys = list(fh.keys())
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert "diffusion_model.transformer_blocks.0.attn.to_q.alpha" in keys
    assert set(adapter_of(g)[0]) == {k[len("diffusion_model.") :] for k in keys if not k.endswith(".alpha")}

    x, t = torch.randn(2, *g.sample_shape), torch.tensor([0.8, 0.3])
    with torch.no_grad():
        want = g(x, t, t, cond)
    base = _velocity_via(_pipe(qwen_pipeline_dir), x, t, cond)
    assert (base - want).abs().max() > 1e-3  # the adapter matters
    for fmt in ("diffusers_lora", "comfyui_lora"):
        pipe = _pipe(qwen_pipeline_dir)
        pipe.load_lora_weights(str(written[fmt]))
        torch.testing.assert_close(_velocity_via(pipe, x, t, cond), want, atol=1e-5, rtol=1e-5, msg=fmt)


def test_export_command(qwen_pipeline_dir, tmp_path, capsys):
    from twinflow.cli import main
    from twinflow.models.export_writer import save_generator

    save_generator(_model(qwen_pipeline_dir).eval(), tmp_path / "native", {})
    assert (
        main(["export", str(tmp_path / "native"), "--format", "diffusers", "--out", str(tmp_path / "o")]) == 0
    )
    assert json.loads((tmp_path / "o" / "diffusers" / "model_index.json").read_text())["_class_name"] == (
        "QwenImagePipeline"
    )
    assert (
        main(["export", str(tmp_path / "native"), "--format", "comfyui_lora", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "no LoRA adapter in this export" in capsys.readouterr().err
    minilm = build_generator(ModelConfig(family="qwen_image", preset="tiny-28g"))
    save_generator(minilm, tmp_path / "m", {})
    assert main(["export", str(tmp_path / "m"), "--format", "diffusers", "--out", str(tmp_path / "o2")]) == 2
    assert "train with model.text_encoder: qwen2.5-vl" in capsys.readouterr().err
