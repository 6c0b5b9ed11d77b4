"""twinflow plan: parameter counts on the meta device, DeepSpeed's model-state accounting, the fitted
activation formula against a fresh measurement, TwinFlow's pass rows, and the CLI verdict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plan_jobs import plan_job

from twinflow.plan.memory import Layout, forward_rows, model_states
from twinflow.plan.planner import workload
from twinflow.train.modelling import copies_made

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


def test_real_qwen_image_transformer_has_20_4b_parameters_on_meta():
    from diffusers import QwenImageTransformer2DModel

    cfg = {k: v for k, v in QWEN_IMAGE_20B.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = QwenImageTransformer2DModel.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).device.type == "meta"
    assert abs(n - 20.4e9) / 20.4e9 < 0.01


@pytest.fixture
def qwen_dir(tmp_path):
    """A Qwen-Image pipeline directory holding only configs (no weights): all `plan` reads."""
    encoder = {"model_type": "qwen2_5_vl", "hidden_size": 3584}
    for sub, cfg in (("transformer", QWEN_IMAGE_20B), ("vae", QWEN_VAE), ("text_encoder", encoder)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer").mkdir()
    return tmp_path


def test_counts_from_a_pretrained_config_without_weights(qwen_dir):
    from twinflow.models.config import ModelConfig
    from twinflow.plan.counts import count_model

    cfg = ModelConfig(
        pretrained_path=str(qwen_dir),
        vae_path=str(qwen_dir),
        image_size=1024,
        text_max_length=64,
        lora={"rank": 64},
    )
    c = count_model(cfg)
    assert abs(c.total - 20.4e9) / 20.4e9 < 0.04  # + E2, text projection, LoRA
    assert c.trainable < 0.05 * c.total
    assert (c.layers, c.width, c.heads) == (60, 3072, 24)
    assert c.image_tokens == (1024 // 8 // 2) ** 2 and c.state_shape == (16, 128, 128)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_match_deepspeed_estimators(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = 20_430_401_088, 339_831_296

    def ours(stage, opt=False, params=False):
        return sum(model_states(total, total, largest, Layout(gpus, stage, opt, params), "bf16")[:4])

    for offload in (False, True):
        _, ds = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=offload)
        assert ours(2, offload) == pytest.approx(ds, rel=0.01)
    for opt, params in ((False, False), (True, False), (True, True)):
        _, ds, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=gpus, cpu_offload=opt, cpu_offload_params=params
        )
        assert ours(3, opt, params) == pytest.approx(ds, rel=0.01)
    # frozen (LoRA base) weights cost no gradients or optimizer states
    lora = sum(model_states(total, total // 50, largest, Layout(gpus, 2), "bf16")[:4])
    assert lora < ours(2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_formula_predicts_a_config_it_was_not_fitted_on(precision):
    from twinflow.plan.activations import FIT_CONFIGS, features, load_fit, measure, probe_config

    shape = (5, 4, 32, 40, 12)  # layers, heads, head_dim, size, text tokens
    assert shape not in FIT_CONFIGS
    model = load_fit("qwen_image")
    for ckpt in (False, True):
        m = measure(probe_config("qwen_image", *shape, ckpt), precision=precision)
        row = model.per_row(m.layers, m.tokens, m.width, m.heads, ckpt, precision)
        block = row.backward - model.per_row(m.layers, m.tokens, m.width, m.heads, False, precision).backward
        if ckpt:  # the measurement holds the checkpoints; the recomputed block is in the backward
            fitted = model.fits[precision]
            assert row.saved == pytest.approx(
                features(m.layers, m.tokens, m.width, m.heads) @ np.array(fitted.saved_ckpt)
            )
            assert block > 0
        # bf16 checkpoints are small and mix bf16 block inputs with fp32 side tensors: 15% there
        assert row.saved == pytest.approx(m.saved, rel=0.15 if ckpt and precision == "bf16" else 0.10), ckpt
        assert row.transient == pytest.approx(m.transient, rel=0.10)
        assert row.backward == pytest.approx(m.backward, rel=0.15), ckpt


def test_twinflow_rows_come_from_the_real_objective():
    from twinflow.method.config import FlowMatchingConfig, TwinFlowConfig

    grad, before, after = forward_rows(TwinFlowConfig(), 8)
    assert grad == 8 and 0 < before <= 4 * 8
    # the rectify pair (2 x the E2E rows) and the last rollout sub-step run after the grad forward
    assert 2 <= after <= 2 * 8
    assert forward_rows(TwinFlowConfig(rollout_order=1, **{"lambda": 0.0}), 8)[2] == 0
    assert forward_rows(FlowMatchingConfig(), 8) == (8, 0, 0)
    # the rollout's rows depend on the drawn times: the plan must not
    torch.manual_seed(123)
    assert forward_rows(TwinFlowConfig(), 8) == (grad, before, after)


def test_a_no_grad_call_after_the_grad_forward_counts_on_top_of_its_saved_activations():
    from dataclasses import replace

    from twinflow.plan.memory import estimate

    job = plan_job()
    base = workload(job)
    alone = replace(base, overlap_rows=0)
    held = replace(base, overlap_rows=3 * base.grad_rows)
    layout = Layout(gpus=1, zero_stage=0)
    c = base.counts
    text = (c.text_tokens, c.text_width, base.tokens - c.text_tokens)
    row = base.activations.per_row(c.layers, base.tokens, c.width, c.heads, False, base.precision, text)
    extra = estimate(held, layout).activations - estimate(alone, layout).activations
    # that call's working set replaces the backward's as what comes on top of the saved activations,
    # and its gathered inputs are alive with it
    assert 3 * row.transient > row.backward and base.input_row > 0
    assert extra == pytest.approx(
        3 * base.grad_rows * (row.transient + base.input_row) - base.grad_rows * row.backward, rel=1e-6
    )


def test_copies_follow_teacher_and_sample_ema():
    assert copies_made(plan_job(**{"method.teacher": "online", "train.sample_ema": "null"})) == 0
    assert copies_made(plan_job(**{"method.teacher": "ema", "train.sample_ema": 0.999})) == 2


def test_plan_cli_says_fits_and_names_the_cheapest_layout(capsys):
    from twinflow.cli import main

    assert main(["plan", "jobs/mnist_twinflow.yaml", "--gpu", "h100-80g", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "cheapest layout that fits: 1 GPU  ZeRO-0  offload -  ckpt off" in out
    assert main(["plan", "jobs/mnist_twinflow.yaml", "--gpu-mem", "2.001GiB"]) == 3
    assert "NO" in capsys.readouterr().out


def test_20b_lora_fits_one_h200_a_full_fine_tune_only_with_offload(qwen_dir):
    from twinflow.plan.gpus import gpu_memory, parse_size
    from twinflow.plan.planner import plan

    model = {
        "pretrained_path": str(qwen_dir),
        "vae_path": str(qwen_dir),
        "image_size": 1024,
        "text_max_length": 64,
        "gradient_checkpointing": True,
        "lora": {"rank": 64},
    }
    job = plan_job(**{"method.teacher": "online", "train.sample_ema": "null", "train.micro_batch": 4})
    job = job.model_copy(update={"model": job.model.model_validate(model)})
    lora = plan(job, gpu_memory("h200-141g"), 1, parse_size("2GiB"))
    assert lora.cheapest.layout.gpus == 1 and lora.cheapest.layout.offload_level == 0
    full = plan(
        job.model_copy(update={"model": job.model.model_copy(update={"lora": None})}),
        gpu_memory("h200-141g"),
        1,
        parse_size("2GiB"),
    )
    assert full.cheapest.layout.gpus == 1 and full.cheapest.layout.offload_level >= 1
    assert full.cheapest.cpu > 16 * 20e9  # fp32 master + Adam states of 20B parameters in host memory


def test_bad_gpu_names_and_sizes_are_clear_errors():
    from twinflow.plan.gpus import gpu_memory, parse_size

    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141GB") == 141 * 10**9
    with pytest.raises(ValueError, match="--gpu-mem"):
        parse_size("eighty")
    with pytest.raises(ValueError, match="h100-80g"):
        gpu_memory("v100")
