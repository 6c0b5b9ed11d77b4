"""A tiny random-init Qwen-Image pipeline built from the real classes and saved in diffusers format.

Nothing comes from a hub: the tokenizer is a byte-level BPE trained here on the prompt template and a
few captions, with the same pre-tokenizer as Qwen2Tokenizer, so the template's system turn is the
same 34 tokens the pipeline drops for the real tokenizer (asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CAPTIONS = [
    "a red cube on a blue table",
    "a photo of a cat",
    "two green apples and a yellow banana",
    "text that says hello world",
]
LATENT_CHANNELS = 4
LATENTS_MEAN = [0.1, 0.2, -0.1, 0.0]
LATENTS_STD = [1.5, 2.0, 1.0, 0.5]
TEXT_WIDTH = 32


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from twinflow.models.qwen_text import DROP_TOKENS, PROMPT_TEMPLATE

    plain = PROMPT_TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "")
    reference = Qwen2Tokenizer()  # empty vocab: only its pre-tokenizer and normaliser are used
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = reference._tokenizer.pre_tokenizer
    bpe.normalizer = reference._tokenizer.normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator([plain.format(c) for c in CAPTIONS] * 4, trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    tok = Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    n = len(tok(PROMPT_TEMPLATE.split("{}")[0]).input_ids)
    assert n == DROP_TOKENS, f"tiny tokenizer splits the template's system turn into {n} tokens"
    return tok


def build_tiny_pipeline(out: Path) -> Path:
    """Save a QwenImagePipeline (VAE factor 2, 4 latent channels, 32-d text) under `out`."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    te_cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TEXT_WIDTH,
            "fullatt_block_indexes": [0],
        },
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256,
            base_shift=0.5,
            max_image_seq_len=8192,
            max_shift=0.9,
            shift=1.0,
            shift_terminal=0.02,
            use_dynamic_shifting=True,
            time_shift_type="exponential",
        ),
        vae=AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2],
            num_res_blocks=1,
            temperal_downsample=[False],
            latents_mean=LATENTS_MEAN,
            latents_std=LATENTS_STD,
        ),
        text_encoder=Qwen2_5_VLForConditionalGeneration(te_cfg).eval(),
        tokenizer=tok,
        transformer=QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=LATENT_CHANNELS * 4,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=TEXT_WIDTH,
            axes_dims_rope=(8, 12, 12),
        ),
    )
    pipe.save_pretrained(str(out))
    return out
