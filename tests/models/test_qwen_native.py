"""Qwen-Image's own components against diffusers' QwenImagePipeline on a tiny random-init pipeline."""

import pytest
import torch
from qwen_pipeline import CAPTIONS, LATENT_CHANNELS, TEXT_WIDTH

from twinflow.models.config import ModelConfig
from twinflow.models.generator import build_generator
from twinflow.models.text_encoder import open_text_encoder


@pytest.fixture(scope="module")
def pipe(qwen_pipeline_dir):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(str(qwen_pipeline_dir), local_files_only=True)


@pytest.fixture(scope="module")
def qwen_encoder(qwen_pipeline_dir):
    return open_text_encoder({"kind": "qwen2.5-vl", "path": str(qwen_pipeline_dir)}, max_length=24)


def _native_config(path, **kw):
    return ModelConfig(
        family="qwen_image",
        pretrained_path=str(path),
        vae_path=str(path),
        image_size=32,
        text_encoder="qwen2.5-vl",
        **kw,
    )


def test_text_states_equal_pipeline_encode_prompt(pipe, qwen_encoder):
    prompts = CAPTIONS[:3] + [""]
    want, want_mask = pipe._get_qwen_prompt_embeds(prompts, device="cpu")
    got = qwen_encoder.encode(prompts)
    n = want.shape[1]
    assert got["text_states"].shape == (4, 24, TEXT_WIDTH) and qwen_encoder.dim == TEXT_WIDTH
    assert torch.equal(got["text_mask"][:, :n], want_mask) and not got["text_mask"][:, n:].any()
    torch.testing.assert_close(got["text_states"][:, :n], want.float(), atol=1e-6, rtol=1e-5)
    assert got["text_states"][:, n:].abs().max() == 0
    # encode_prompt (the public entry) agrees as well, and a caption's states don't depend on its batch
    embeds, _ = pipe.encode_prompt(CAPTIONS[1], device="cpu")
    alone = qwen_encoder.encode([CAPTIONS[1]])["text_states"][:, : embeds.shape[1]]
    torch.testing.assert_close(alone, embeds.float(), atol=1e-6, rtol=1e-5)


def test_generator_at_r_equals_t_is_the_pretrained_transformer(qwen_pipeline_dir, pipe, qwen_encoder):
    g = build_generator(_native_config(qwen_pipeline_dir)).eval()
    assert g.sample_shape == (LATENT_CHANNELS, 16, 16) and isinstance(g.text_proj, torch.nn.Identity)
    assert g.text_encoder_spec == {
        "kind": "qwen2.5-vl",
        "path": str(qwen_pipeline_dir),
        "max_length": 32,
        "null_prompt": "Generate an image.",
    }
    cond = qwen_encoder.encode(CAPTIONS[:2])
    x, t = torch.randn(2, LATENT_CHANNELS, 16, 16), torch.tensor([0.9, 0.35])
    packed = pipe._pack_latents(x, 2, LATENT_CHANNELS, 16, 16)
    with torch.no_grad():
        raw = pipe.transformer(
            hidden_states=packed,
            timestep=t,
            encoder_hidden_states=cond["text_states"],
            encoder_hidden_states_mask=cond["text_mask"],
            img_shapes=[[(1, 8, 8)]] * 2,
            return_dict=False,
        )[0]
        ours = g(x, t, t, cond)
    assert torch.equal(ours, pipe._unpack_latents(raw, 32, 32, pipe.vae_scale_factor).squeeze(2))
    assert torch.equal(pipe._pack_latents(ours, 2, LATENT_CHANNELS, 16, 16), raw)


def test_latents_match_the_pipeline_normalisation_and_packing(qwen_pipeline_dir, pipe):
    from twinflow.models.vae import LatentCodec

    codec = LatentCodec.from_pretrained(qwen_pipeline_dir)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(images)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():  # what the Qwen-Image training scripts and edit pipelines do
        raw = vae.encode(images.unsqueeze(2)).latent_dist.mode()
    torch.testing.assert_close(z, ((raw - mean) / std).squeeze(2), atol=1e-6, rtol=1e-6)
    # The pipeline's decode path: unpack tokens, undo the normalisation, decode frame 0.
    packed = pipe._pack_latents(z, 2, LATENT_CHANNELS, 16, 16)
    lat = pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor)
    lat = lat / (1.0 / std) + mean
    with torch.no_grad():
        want = vae.decode(lat, return_dict=False)[0][:, :, 0]
    torch.testing.assert_close(codec.decode(z), want.clamp(-1, 1), atol=1e-6, rtol=1e-6)


def test_config_rules_for_the_text_encoder(qwen_pipeline_dir, tmp_path):
    with pytest.raises(ValueError, match="is Qwen-Image's"):
        ModelConfig(family="sana", preset="tiny-28g", text_encoder="qwen2.5-vl", text_encoder_path="/x")
    with pytest.raises(ValueError, match="needs model.text_encoder_path or model.pretrained_path"):
        ModelConfig(family="qwen_image", preset="tiny-28g", text_encoder="qwen2.5-vl")
    with pytest.raises(ValueError, match="text_encoder_path applies to text_encoder: qwen2.5-vl only"):
        ModelConfig(family="qwen_image", preset="tiny-28g", text_encoder_path="/x")
    with pytest.raises(FileNotFoundError, match="missing text_encoder/config.json"):
        build_generator(
            ModelConfig(
                family="qwen_image",
                preset="tiny-28g",
                text_encoder="qwen2.5-vl",
                text_encoder_path=str(tmp_path),
            )
        )
    # A random-init preset with the native encoder takes its width, with no projection in between.
    g = build_generator(
        ModelConfig(
            family="qwen_image",
            preset="tiny-32rgb",
            text_encoder="qwen2.5-vl",
            text_encoder_path=str(qwen_pipeline_dir),
        )
    )
    assert g.backbone.config.joint_attention_dim == TEXT_WIDTH and not list(g.text_proj.parameters())


def test_native_export_round_trip_keeps_the_encoder(qwen_pipeline_dir, qwen_encoder, tmp_path):
    from twinflow.models.export_loader import load_generator
    from twinflow.models.export_writer import save_generator

    g = build_generator(_native_config(qwen_pipeline_dir, e2_init="random")).eval()
    save_generator(g, tmp_path / "e", {})
    back, meta = load_generator(tmp_path / "e")
    assert meta["text_encoder"]["kind"] == "qwen2.5-vl" and meta["text_encoder"]["dim"] == TEXT_WIDTH
    assert back.text_encoder_spec["path"] == str(qwen_pipeline_dir)
    cond = qwen_encoder.encode(CAPTIONS[:2])
    x, t, r = torch.randn(2, LATENT_CHANNELS, 16, 16), torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.2])
    with torch.no_grad():
        assert torch.equal(back(x, t, r, cond), g(x, t, r, cond))
    # Fine-tuning from the export: its twinflow.json names the pipeline whose encoder it was trained with.
    again = build_generator(
        ModelConfig(
            family="qwen_image",
            pretrained_path=str(tmp_path / "e"),
            vae_path=str(qwen_pipeline_dir),
            image_size=32,
            text_encoder="qwen2.5-vl",
        )
    ).eval()
    assert again.text_encoder_spec["path"] == str(qwen_pipeline_dir)
    with torch.no_grad():
        assert torch.equal(again(x, t, r, cond), g(x, t, r, cond))


def test_pretrained_path_on_s3_is_cached_locally(qwen_pipeline_dir, bucket, tmp_path, monkeypatch):
    from twinflow import storage

    monkeypatch.setenv("TWINFLOW_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{bucket}/models/qwen-tiny"
    storage.upload_dir(qwen_pipeline_dir, uri)
    enc = open_text_encoder({"kind": "qwen2.5-vl", "path": uri}, max_length=8)  # a data actor's view
    assert enc.dim == TEXT_WIDTH
    cache = tmp_path / "cache"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["text_encoder", "tokenizer"]
    g = build_generator(_native_config(uri)).eval()
    local = build_generator(_native_config(qwen_pipeline_dir)).eval()
    for (n, p), (m, q) in zip(g.state_dict().items(), local.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    assert len([p for p in cache.iterdir() if p.name.startswith("qwen-tiny-")]) == 1


def test_data_stage_takes_qwen_from_a_pipeline_dir(qwen_pipeline_dir, qwen_encoder):
    from twinflow.data.embed import TextEmbedStage

    stage = TextEmbedStage(max_length=24, model_dir=str(qwen_pipeline_dir))
    assert stage.dim == TEXT_WIDTH and stage.encoder.kind == "qwen2.5-vl"
    states, mask = stage._encode(CAPTIONS[:2])
    want = qwen_encoder.encode(CAPTIONS[:2])
    assert torch.equal(torch.from_numpy(states), want["text_states"])
    assert torch.equal(torch.from_numpy(mask), want["text_mask"])


def test_a_twinflow_step_on_the_native_components(qwen_pipeline_dir, qwen_encoder):
    """VAE latents + Qwen2.5-VL states + the pretrained transformer through the real objective."""
    from twinflow.method.twinflow import TwinFlowObjective
    from twinflow.models.vae import LatentCodec

    torch.manual_seed(0)
    g = build_generator(_native_config(qwen_pipeline_dir, text_max_length=24))
    z = LatentCodec.from_pretrained(qwen_pipeline_dir).encode(torch.rand(8, 3, 32, 32) * 2 - 1)
    cond = qwen_encoder.encode([CAPTIONS[i % 4] for i in range(8)])
    out = TwinFlowObjective()(
        g,
        z,
        cond,
        teacher=None,
        null_cond=qwen_encoder.null_condition(),
        generator=torch.Generator().manual_seed(1),
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and {f"loss_{n}" for n in ("e2e", "mul", "any", "adv")} <= set(
        out.metrics
    )
    grads = {n: p.grad for n, p in g.named_parameters() if p.grad is not None}
    assert any(".twin_e2." in n and v.abs().max() > 0 for n, v in grads.items())
    assert grads["backbone.txt_in.weight"].abs().max() > 0  # the text path trains from the start
