"""Export / load round trips, and the pretrained + VAE path through the real diffusers loading code."""

import copy
import json

import pytest
import torch
from conftest import make_generator, random_cond

from twinflow.models.config import LoraSettings, ModelConfig
from twinflow.models.export_loader import load_export_codec, load_generator
from twinflow.models.export_writer import save_generator
from twinflow.models.generator import build_generator
from twinflow.models.lora import apply_lora, lora_state_dict


def _train(g, steps=2):
    x, t, r, cond = torch.randn(4, *g.sample_shape), torch.rand(4), torch.rand(4) * 0.3, random_cond(4)
    opt = torch.optim.AdamW([p for p in g.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        g(x, t, r, cond).square().mean().backward()
        opt.step()


def _probe(g, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *g.sample_shape, generator=gen)
    return x, torch.tensor([1.0, 0.6, -0.4]), torch.tensor([0.0, 0.3, -0.4]), random_cond(3, seed=seed)


def test_round_trip_is_exact(family, tmp_path):
    torch.manual_seed(0)
    g = make_generator(family, "tiny-32rgb", e2_init="random")
    _train(g)
    out = save_generator(g, tmp_path / "export", {"method": "twinflow", "step": 2})
    assert sorted(p.name for p in out.iterdir()) == [
        "transformer",
        "twinflow.json",
        "twinflow_extra.safetensors",
    ]
    loaded, meta = load_generator(out)
    assert not loaded.training
    assert meta["method"] == "twinflow" and meta["step"] == 2 and meta["family"] == family
    assert meta["sample_shape"] == [3, 32, 32] and meta["text_encoder"]["dim"] == 384
    assert meta["model_config"]["preset"] == "tiny-32rgb" and meta["lora"] is None
    assert loaded.model_config == g.model_config
    g.eval()
    x, t, r, cond = _probe(g)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, r, cond), g(x, t, r, cond))
    for (n, p), (m, q) in zip(g.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(p, q), n


def test_transformer_dir_loads_in_plain_diffusers(family, tmp_path):
    torch.manual_seed(0)
    g = make_generator(family)
    _train(g)
    save_generator(g, tmp_path / "e", {})
    plain = g.family.backbone_class().from_pretrained(str(tmp_path / "e" / "transformer"))
    x, t, _, cond = _probe(g)
    text = g.text_proj(cond["text_states"])
    with torch.no_grad():  # plain diffusers = the base velocity field, i.e. our model at r = t
        want = g(x, t, t, cond)
        got = g.family.forward(plain, x, t * g.time_scale, text, cond["text_mask"], None)
    assert torch.equal(got, want)


def test_lora_export_merged_plus_adapter(family, tmp_path):
    torch.manual_seed(0)
    g = make_generator(family)
    base = copy.deepcopy(g)
    apply_lora(g, LoraSettings(rank=4))
    _train(g)
    g.eval()
    save_generator(g, tmp_path / "e", {"method": "twinflow"})
    meta = json.loads((tmp_path / "e" / "twinflow.json").read_text())
    assert meta["lora"]["merged"] and meta["lora"]["rank"] == 4
    assert (tmp_path / "e" / "lora" / "adapter_model.safetensors").is_file()
    loaded, _ = load_generator(tmp_path / "e")
    assert not any(".lora_" in n for n, _ in loaded.named_parameters())
    x, t, r, cond = _probe(g)
    with torch.no_grad():
        want = g(x, t, r, cond)
        torch.testing.assert_close(loaded(x, t, r, cond), want, atol=1e-5, rtol=1e-5)
    # The separate adapter re-applies exactly onto the original base.
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    apply_lora(base, LoraSettings(rank=4))
    set_peft_model_state_dict(
        base.backbone, load_file(str(tmp_path / "e" / "lora" / "adapter_model.safetensors"))
    )
    for name in ("text_proj",):
        getattr(base, name).load_state_dict(getattr(g, name).state_dict())
    e2 = {k: v for k, v in g.state_dict().items() if ".twin_e2." in k}
    base.load_state_dict(e2, strict=False)
    base.eval()
    with torch.no_grad():
        assert torch.equal(base(x, t, r, cond), want)
    assert set(lora_state_dict(base)) == set(lora_state_dict(g))


def test_export_overwrites_and_rejects_reserved_metadata(tmp_path):
    g = make_generator("sana")
    save_generator(g, tmp_path / "e", {"step": 1})
    save_generator(g, tmp_path / "e", {"step": 2})
    assert json.loads((tmp_path / "e" / "twinflow.json").read_text())["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temp dirs left behind
    with pytest.raises(ValueError, match=r"\['family'\]"):
        save_generator(g, tmp_path / "f", {"family": "x"})
    with pytest.raises(FileNotFoundError, match="not a TwinFlow export"):
        load_generator(tmp_path)


def _tiny_vae(kind: str):
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage

    if kind == "qwen":
        return AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=[0.1, 0.2, -0.1, 0.0],
            latents_std=[1.5, 2.0, 1.0, 0.5],
        )
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
        shift_factor=0.1,
    )


def _tiny_backbone(family: str, latent_channels: int):
    from twinflow.models.presets import get_preset
    from twinflow.models.registry import get_family

    fam = get_family(family)
    return fam.build_backbone(fam.preset_config(get_preset(family, "tiny-28g"), latent_channels, 2, 16))


@pytest.mark.parametrize("family,vae_kind", [("qwen_image", "qwen"), ("sana", "kl")])
def test_pretrained_and_vae_through_real_loaders(family, vae_kind, tmp_path):
    torch.manual_seed(0)
    pipe = tmp_path / "pipe"
    backbone, vae = _tiny_backbone(family, 4), _tiny_vae(vae_kind)
    backbone.save_pretrained(str(pipe / "transformer"))
    vae.save_pretrained(str(pipe / "vae"))

    cfg = ModelConfig(family=family, pretrained_path=str(pipe), vae_path=str(pipe), image_size=32)
    g = build_generator(cfg)
    assert g.sample_shape == (4, 16, 16) and g.image_size == 32 and g.latent["factor"] == 2
    for k, v in backbone.state_dict().items():
        assert torch.equal(g.backbone.state_dict()[k], v), k
    x, t, r, cond = _probe(g)
    with torch.no_grad():
        text = g.text_proj(cond["text_states"])
        base = g.family.forward(backbone, x, t * g.time_scale, text, cond["text_mask"], None)
        assert torch.equal(g(x, t, t, cond), base)

    from twinflow.models.vae import LatentCodec

    codec = LatentCodec.from_pretrained(pipe)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 4, 16, 16)
    raw_in = images.unsqueeze(2) if vae_kind == "qwen" else images
    with torch.no_grad():
        raw = vae.encode(raw_in).latent_dist.mode()
        raw = raw.squeeze(2) if vae_kind == "qwen" else raw
    if vae_kind == "qwen":
        want = (raw - torch.tensor([0.1, 0.2, -0.1, 0.0]).view(1, 4, 1, 1)) / torch.tensor(
            [1.5, 2.0, 1.0, 0.5]
        ).view(1, 4, 1, 1)
    else:
        want = (raw - 0.1) * 0.5
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        raw_dec = vae.decode(raw.unsqueeze(2) if vae_kind == "qwen" else raw).sample
    torch.testing.assert_close(
        codec.decode(z),
        (raw_dec.squeeze(2) if vae_kind == "qwen" else raw_dec).clamp(-1, 1),
        atol=1e-4,
        rtol=1e-4,
    )

    # Export with the codec, load back, and fine-tune from the export (keeps trained E2 + projection).
    _train(g)
    g.eval()
    save_generator(g, tmp_path / "export", {"method": "twinflow"}, codec=codec)
    loaded, meta = load_generator(tmp_path / "export")
    assert meta["latent"]["vae_dir"] == "vae" and meta["image_size"] == 32
    with torch.no_grad():
        assert torch.equal(loaded(x, t, r, cond), g(x, t, r, cond))
    codec2 = load_export_codec(tmp_path / "export")
    torch.testing.assert_close(codec2.encode(images), z, atol=0, rtol=0)
    again = build_generator(
        ModelConfig(
            family=family,
            pretrained_path=str(tmp_path / "export"),
            vae_path=str(tmp_path / "export"),
            image_size=32,
        )
    )
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, r, cond), g(x, t, r, cond))


def test_pretrained_errors_name_the_problem(tmp_path):
    sana = _tiny_backbone("sana", 4)
    sana.save_pretrained(str(tmp_path / "s"))
    with pytest.raises(
        ValueError, match="holds a SanaTransformer2DModel, but model family 'qwen_image' needs"
    ):
        build_generator(ModelConfig(family="qwen_image", pretrained_path=str(tmp_path / "s"), image_size=16))
    with pytest.raises(ValueError, match="models 4 channels but the pixel state has 3"):
        build_generator(
            ModelConfig(family="sana", pretrained_path=str(tmp_path / "s"), image_size=16, channels=3)
        )
    with pytest.raises(FileNotFoundError, match="no diffusers transformer"):
        build_generator(ModelConfig(family="sana", pretrained_path=str(tmp_path), image_size=16))
    _tiny_vae("kl").save_pretrained(str(tmp_path / "v"))
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
        build_generator(
            ModelConfig(
                family="sana",
                pretrained_path=str(tmp_path / "s"),
                vae_path=str(tmp_path / "v"),
                image_size=33,
            )
        )
    g = build_generator(
        ModelConfig(family="sana", pretrained_path=str(tmp_path / "s"), image_size=16, channels=4)
    )
    assert g.sample_shape == (4, 16, 16)


def test_from_pretrained_infers_family_and_loads_exports(tmp_path):
    from twinflow.models.generator import TwinFlowGenerator

    torch.manual_seed(0)
    _tiny_backbone("sana", 4).save_pretrained(str(tmp_path / "pipe" / "transformer"))
    g = TwinFlowGenerator.from_pretrained(tmp_path / "pipe", channels=4, e2_init="random")
    assert g.family.name == "sana" and g.sample_shape == (4, 16, 16) and g.e2_init == "random"
    _tiny_backbone("qwen_image", 4).save_pretrained(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="pass image_size"):
        TwinFlowGenerator.from_pretrained(tmp_path / "q", channels=4)
    q = TwinFlowGenerator.from_pretrained(tmp_path / "q", image_size=16, channels=4, lora={"rank": 2})
    assert q.family.name == "qwen_image" and any(".lora_" in n for n, _ in q.named_parameters())
    save_generator(g, tmp_path / "e", {})
    back = TwinFlowGenerator.from_pretrained(tmp_path / "e")
    x, t, r, cond = _probe(g)
    with torch.no_grad():
        assert torch.equal(back(x, t, r, cond), g.eval()(x, t, r, cond))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="'UNet2DModel' is not a supported backbone"):
        TwinFlowGenerator.from_pretrained(tmp_path / "bad", image_size=16)
