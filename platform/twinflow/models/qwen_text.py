"""Qwen-Image's own caption encoder: Qwen2.5-VL's last hidden states under the pipeline's prompt template.

This mirrors diffusers' `QwenImagePipeline.encode_prompt` (0.42): each caption is wrapped in the
system template, tokenized, run through `Qwen2_5_VLForConditionalGeneration` and the first 34
template tokens are dropped. The differences are ours to make rows concatenable: every caption is
padded to `max_length` tokens after the drop (the pipeline pads to the longest in the batch) and the
states come back as float32. Right padding with causal attention leaves the valid states unchanged,
so for the valid positions the result equals the pipeline's (tested on a tiny pipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from twinflow import storage
from twinflow.models.fetch import local_model_dir
from twinflow.models.text_base import QWEN25_VL, CachedTextEncoder, offline_quiet_loading

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
DROP_TOKENS = 34  # the template's system turn + "<|im_start|>user\n", as in the pipeline
MAX_LENGTH = 1024  # the pipeline's limit after the drop


def is_qwen_pipeline(path: str | Path) -> bool:
    """Whether `path` (local or s3://) holds a Qwen2.5-VL text_encoder/ (read from its config alone)."""
    uri = f"{str(path).rstrip('/')}/text_encoder/config.json"
    if not storage.exists(uri):
        return False
    return json.loads(storage.read_bytes(uri)).get("model_type", "").startswith("qwen2_5_vl")


def resolve_encoder_path(path: str | Path) -> str:
    """A Qwen-Image pipeline dir as given; one of our exports (fine-tuning from it) names the pipeline
    it was trained with in its twinflow.json, unless it holds a copy (the diffusers format)."""
    path = str(path)
    meta_uri = f"{path.rstrip('/')}/twinflow.json"
    if is_qwen_pipeline(path) or not storage.exists(meta_uri):
        return path
    text = json.loads(storage.read_bytes(meta_uri)).get("text_encoder", {})
    if text.get("kind") == "qwen2.5-vl" and text.get("path"):
        return str(text["path"])
    return path


def encoder_dirs(path: str | Path) -> tuple[Path, Path]:
    """(text_encoder dir, tokenizer dir) of a Qwen-Image pipeline directory (local or s3://)."""
    found: dict[str, Path | None] = {}
    for part in ("text_encoder", "tokenizer"):
        try:
            found[part] = local_model_dir(path, part)
        except FileNotFoundError:  # an s3 prefix with nothing under it
            found[part] = None
    enc, tok = found["text_encoder"], found["tokenizer"]
    missing = [
        name
        for name, ok in (
            ("text_encoder/config.json", enc is not None and (enc / "config.json").is_file()),
            ("tokenizer/", tok is not None and tok.is_dir()),
        )
        if not ok
    ]
    if missing:
        raise FileNotFoundError(
            f"{path}: not a Qwen-Image pipeline directory for the qwen2.5-vl text encoder "
            f"(missing {', '.join(missing)})"
        )
    return enc, tok


def encoder_width(path: str | Path) -> int:
    """The encoder's hidden size from its config alone (3584 for Qwen2.5-VL-7B)."""
    cfg = json.loads((encoder_dirs(path)[0] / "config.json").read_text())
    width = (cfg.get("text_config") or {}).get("hidden_size", cfg.get("hidden_size"))
    if width is None:  # transformers 5 nests it under text_config; older saves keep it at the top
        raise ValueError(f"{path}: text_encoder/config.json has no hidden_size")
    return int(width)


class QwenTextEncoder(CachedTextEncoder):
    """Caption -> (text_states float32 (B, L, width), text_mask int64 (B, L)), L = max_length."""

    def __init__(
        self,
        path: str | Path,
        max_length: int = 256,
        device: str = "cpu",
        cache_size: int = 256,
        dtype: torch.dtype | None = None,
        null_prompt: str = "",
    ) -> None:
        if not 1 <= max_length <= MAX_LENGTH:
            raise ValueError(
                f"max_length must be in [1, {MAX_LENGTH}] (the pipeline's limit), got {max_length}"
            )
        super().__init__(max_length, device, cache_size, null_prompt)
        enc_dir, tok_dir = encoder_dirs(path)
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer  # heavy: at load only

        kwargs = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        with offline_quiet_loading():
            self.tokenizer = Qwen2Tokenizer.from_pretrained(str(tok_dir), local_files_only=True)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(enc_dir), **kwargs)
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer.padding_side = "right"
        self.dim = int(self.model.config.text_config.hidden_size)
        self.kind = QWEN25_VL
        self.model_dir = str(path)
        self.name = f"qwen2.5-vl:{Path(str(path).rstrip('/')).name}"

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            [PROMPT_TEMPLATE.format(c) for c in captions],
            padding="max_length",
            truncation=True,
            max_length=self.max_length + DROP_TOKENS,
            return_tensors="pt",
        ).to(self.device)
        out = self.model(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, output_hidden_states=True
        )
        states = out.hidden_states[-1][:, DROP_TOKENS:].float()
        mask = tok.attention_mask[:, DROP_TOKENS:].to(torch.int64)
        states = states * mask.unsqueeze(-1).to(states.dtype)
        return states.cpu(), mask.cpu()
