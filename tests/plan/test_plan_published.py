"""`twinflow plan` before download (the published Qwen-Image configs shipped with the package) and the
EMA as it is held: a second adapter for LoRA, sharded with the optimizer for full fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plan_jobs import MNIST_JOB, no_weights, plan_job

from twinflow.plan.memory import Layout, ema_states

SHIPPED_JOB = "jobs/qwen_image_lora.yaml"
# the published values that decide the plan, written out here by hand (diffusers docs, model cards)
QWEN_IMAGE_20B = {
    "_class_name": "QwenImageTransformer2DModel",
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "in_channels": 64,
    "out_channels": 16,
    "patch_size": 2,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False,
}
QWEN_VAE = {"_class_name": "AutoencoderKLQwenImage", "z_dim": 16, "temperal_downsample": [False, True, True]}
QWEN_ENCODER = {"model_type": "qwen2_5_vl", "hidden_size": 3584}


def _no_weights(tmp_path: Path) -> list[str]:
    return [arg for s in no_weights(tmp_path) for arg in ("--set", s)]


def test_plan_answers_for_the_shipped_qwen_recipe_with_no_model_files(tmp_path, capsys):
    """Without weights or configs the plan equals the plan of a pipeline directory holding the
    Qwen-Image configs (the values above), and says which config it used."""
    from twinflow.cli import main

    assert main(["plan", SHIPPED_JOB, "--gpu", "h100-80g", *_no_weights(tmp_path)]) == 0
    out = capsys.readouterr().out
    for part in ("transformer", "vae", "text_encoder"):
        assert f"config {part}: published config of Qwen/Qwen-Image shipped with twinflow" in out
    assert "cheapest layout that fits: 1 GPU" in out

    pipeline = tmp_path / "configs-only"
    for sub, cfg in (("transformer", QWEN_IMAGE_20B), ("vae", QWEN_VAE), ("text_encoder", QWEN_ENCODER)):
        (pipeline / sub).mkdir(parents=True)
        (pipeline / sub / "config.json").write_text(json.dumps(cfg))
    (pipeline / "tokenizer").mkdir()
    sets = ["--set", f"model.pretrained_path={pipeline}", "--set", f"model.vae_path={pipeline}"]
    assert main(["plan", SHIPPED_JOB, "--gpu", "h100-80g", *sets]) == 0
    local = capsys.readouterr().out

    def table(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("config ")]

    assert table(out) == table(local)
    assert "60 blocks x 3072 (24 heads)" in out


def test_plan_of_the_job_file_as_shipped_needs_no_model_files(capsys):
    from twinflow.cli import main

    if (Path("/mnt/models/Qwen-Image") / "transformer" / "config.json").exists():
        pytest.skip("this machine holds the Qwen-Image pipeline: the plan reads its own configs")
    assert main(["plan", SHIPPED_JOB]) == 0
    assert "(/mnt/models/Qwen-Image holds no transformer config.json)" in capsys.readouterr().out


def test_a_directory_with_configs_is_read_instead_and_unknown_keys_are_ignored(tmp_path):
    """A real pipeline directory wins; its transformer config, like the published one, carries
    `pooled_projection_dim`, which today's diffusers class does not take (from_pretrained ignores it)."""
    from twinflow.models.config import ModelConfig
    from twinflow.plan.counts import count_model
    from twinflow.plan.published import published_configs

    pub = published_configs("qwen_image")
    assert pub["transformer"]["pooled_projection_dim"] == 768
    for part in ("transformer", "vae", "text_encoder"):
        (tmp_path / part).mkdir()
        cfg = dict(pub[part])
        if part == "transformer":
            cfg["num_layers"] = 2  # so the counts show which config was read
        (tmp_path / part / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer").mkdir()
    model = ModelConfig(
        pretrained_path=str(tmp_path), vae_path=str(tmp_path), text_encoder="qwen2.5-vl", image_size=512
    )
    counts = count_model(model)
    assert counts.layers == 2
    assert counts.configs == tuple(f"{p}: {tmp_path}" for p in ("transformer", "vae", "text_encoder"))


def test_a_family_with_no_published_config_is_a_clear_error(tmp_path):
    from twinflow.models.config import ModelConfig
    from twinflow.plan.counts import count_model

    model = ModelConfig(family="sana", pretrained_path=str(tmp_path), image_size=64)
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_path .*no published sana config"):
        count_model(model)


def test_averages_are_a_whole_adapter_plus_slices_and_live_where_the_optimizer_does():
    trainable, adapter = 1_000_000, 600_000
    # LoRA: the averaged adapter whole on every rank, E2 and the text projection sliced 1/world
    assert ema_states(trainable, adapter, 2, Layout(8, 3)) == (2 * 4 * (adapter + 400_000 // 8), 0)
    # a full fine-tune: 1/world of every trainable weight, at every stage (ZeRO-0 included)
    assert ema_states(trainable, 0, 1, Layout(8, 3)) == (4 * trainable // 8, 0)
    assert ema_states(trainable, 0, 1, Layout(8, 0)) == (4 * trainable // 8, 0)
    assert ema_states(trainable, 0, 1, Layout(8, 2, offload_optimizer=True)) == (0, 4 * trainable // 8)
    assert ema_states(trainable, adapter, 1, Layout(8, 3, True, True)) == (0, 4 * (adapter + 400_000 // 8))
    assert ema_states(trainable, 0, 0, Layout(8, 1)) == (0, 0)


def test_20b_lora_recipe_with_an_ema_teacher_fits_one_80gb_gpu(weightless_job):
    from twinflow.plan.gpus import gpu_memory, parse_size
    from twinflow.plan.planner import plan

    job = weightless_job(SHIPPED_JOB, "method.teacher=ema")
    result = plan(job, gpu_memory("h100-80g"), 1, parse_size("2GiB"))
    c = result.work.counts
    assert result.work.emas == 1 and result.work.lora
    assert result.cheapest is not None and result.cheapest.layout.gpus == 1
    fitting = [e for e in result.table if e.peak <= result.capacity]
    assert fitting, "no layout of one 80 GB GPU holds the 20B LoRA recipe with an EMA teacher"
    for e in result.table:  # one GPU: the adapter EMA is the fp32 LoRA + E2 + text projection
        assert e.ema == (0 if e.layout.offload_level else 4 * c.trainable)
        build = 2 * c.total if e.layout.zero_stage < 3 else 2 * c.total + 4 * c.largest_module
        if e.layout.offload_params:
            build = 4 * c.largest_module
        assert e.startup == build + e.ema
    # a whole fp32 copy of the generator would not fit an 80 GB GPU at all
    assert 4 * c.total > result.capacity


def test_startup_follows_the_partitioned_build_of_a_zero3_full_fine_tune(weightless_job):
    from twinflow.models import build_generator
    from twinflow.plan.counts import count_model
    from twinflow.plan.memory import startup_bytes

    c = count_model(weightless_job("jobs/qwen_image_full.yaml").model)
    # ZeRO-3 builds partitioned (train/sharded_build.py): the rank's 1/8 plus one module gathered
    # and the tensor read into it, never the whole model
    assert startup_bytes(c, Layout(8, 3), "bf16") == 2 * c.total // 8 + 4 * c.largest_module
    assert startup_bytes(c, Layout(8, 3, True, True), "bf16") == 4 * c.largest_module  # partition on host
    assert startup_bytes(c, Layout(8, 2), "bf16") == 2 * c.total  # below ZeRO-3 the whole model
    assert startup_bytes(c, Layout(8, 3), "bf16") < 2 * c.total / 7
    # the module a build gathers is the largest module's own weights, in a real tiny generator too
    tiny = plan_job(MNIST_JOB).model
    gen = build_generator(tiny)
    own = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in gen.modules())
    assert count_model(tiny).largest_module == own > 0


def test_deepspeeds_gradient_bucket_is_counted_under_zero_whatever_the_model_size():
    """DeepSpeed allocates `reduce_bucket_size` (5e8) gradient elements on the device under ZeRO-1/2/3
    (ZeRO-3 at engine start: `benchmarks/plan_rehearsal.py` measures the 1e9 bytes on each rank)."""
    from twinflow.plan.memory import reduce_bucket_bytes

    assert reduce_bucket_bytes(Layout(8, 3, True, True), "bf16") == 1_000_000_000
    assert reduce_bucket_bytes(Layout(2, 1), "fp32") == 2_000_000_000
    assert reduce_bucket_bytes(Layout(1, 0), "bf16") == 0
