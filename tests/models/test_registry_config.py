"""Family/preset registry and the `model:` config section: bad input gets an error naming it."""

import pytest

from twinflow.config import ConfigError
from twinflow.config.loading import validate
from twinflow.models.config import ModelConfig
from twinflow.models.presets import PRESETS, family_names, get_preset
from twinflow.models.registry import _FAMILY_MODULES, get_family


def test_every_family_has_a_module_and_the_required_presets():
    assert set(PRESETS) == set(_FAMILY_MODULES) == set(family_names())
    for fam in PRESETS:
        assert {"tiny-28g", "tiny-32rgb", "small-28g", "small-32rgb"} <= set(PRESETS[fam])
        assert get_family(fam).name == fam
    p = get_preset("qwen_image", "tiny-32rgb")
    assert (p.image_size, p.channels) == (32, 3)


def test_unknown_family_and_preset_are_named():
    with pytest.raises(ValueError, match=r"unknown model family 'dit9'.*qwen_image, sana"):
        get_family("dit9")
    with pytest.raises(ValueError, match=r"unknown preset 'huge' for model family 'sana'.*tiny-28g"):
        get_preset("sana", "huge")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"jobs/x.yaml: family: .*unknown model family 'qwen'"):
        validate(ModelConfig, {"family": "qwen", "preset": "tiny-28g"}, "jobs/x.yaml")
    with pytest.raises(ConfigError, match=r"unknown preset 'tiny-64' for model family 'qwen_image'"):
        validate(ModelConfig, {"preset": "tiny-64"}, "j.yaml")
    with pytest.raises(ConfigError, match="exactly one of model.preset"):
        validate(ModelConfig, {"family": "sana"}, "j.yaml")
    with pytest.raises(ConfigError, match="exactly one of model.preset"):
        validate(ModelConfig, {"preset": "tiny-28g", "pretrained_path": "/x"}, "j.yaml")
    with pytest.raises(ConfigError, match="e2_init"):
        validate(ModelConfig, {"preset": "tiny-28g", "e2_init": "zeros"}, "j.yaml")
    with pytest.raises(ConfigError, match="lora.rank"):
        validate(ModelConfig, {"preset": "tiny-28g", "lora": {"rank": 0}}, "j.yaml")
    with pytest.raises(ConfigError, match="lora.alpah: unknown field"):
        validate(ModelConfig, {"preset": "tiny-28g", "lora": {"alpah": 2}}, "j.yaml")
    with pytest.raises(ConfigError, match="not divisible by patch 3"):
        validate(ModelConfig, {"preset": "tiny-32rgb", "patch": 3}, "j.yaml")
    with pytest.raises(ConfigError, match="needs model.image_size"):
        validate(ModelConfig, {"pretrained_path": "/some/dir"}, "j.yaml")
    with pytest.raises(ConfigError, match="patch applies to presets only"):
        validate(ModelConfig, {"pretrained_path": "/d", "image_size": 32, "patch": 2}, "j.yaml")
    with pytest.raises(ConfigError, match="channels must be 3"):
        validate(ModelConfig, {"preset": "tiny-32rgb", "vae_path": "/v", "channels": 1}, "j.yaml")


def test_config_validation_does_not_import_diffusers():
    import subprocess
    import sys

    code = (
        "import sys; from twinflow.models.config import ModelConfig; "
        "ModelConfig(family='sana', preset='tiny-28g'); print('diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_backbone_override_is_named():
    from twinflow.models.generator import build_generator

    with pytest.raises(
        ValueError,
        match=r"model family 'qwen_image': unknown QwenImageTransformer2DModel option\(s\) \['num_layer'\]",
    ):
        build_generator(ModelConfig(preset="tiny-28g", backbone={"num_layer": 1}))


def test_backbone_overrides_and_patch_apply():
    from twinflow.models.generator import build_generator

    g = build_generator(ModelConfig(family="sana", preset="tiny-32rgb", patch=2, backbone={"num_layers": 1}))
    assert g.patch == 2 and len(g.backbone.transformer_blocks) == 1 and g.sample_shape == (3, 32, 32)
    g = build_generator(ModelConfig(preset="tiny-28g", image_size=32, channels=3))
    assert g.sample_shape == (3, 32, 32) and g.backbone.config.in_channels == 3 * 4 * 4


def test_unsupported_backbone_options_are_rejected():
    from twinflow.models.generator import build_generator

    with pytest.raises(ValueError, match="guidance_embeds"):
        build_generator(ModelConfig(family="sana", preset="tiny-28g", backbone={"guidance_embeds": True}))
    with pytest.raises(ValueError, match="in_channels=5 must equal out_channels"):
        build_generator(ModelConfig(preset="tiny-28g", backbone={"in_channels": 5}))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        get_family("qwen_image").preset_config(
            get_preset("qwen_image", "tiny-28g").__class__(
                "bad", 28, 1, 4, {**get_preset("qwen_image", "tiny-28g").dims, "axes_dims_rope": (4, 4, 4)}
            ),
            1,
            4,
            28,
        )
