"""What every caption encoder shares: the per-caption LRU cache and quiet offline loading.

`twinflow.models.text_encoder` (MiniLM and the factories) and `twinflow.models.qwen_text` (Qwen2.5-VL)
both build on it, so neither imports the other's module for its base class.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

QWEN25_VL = "qwen2.5-vl"


class CachedTextEncoder:
    """Fixed-length caption states with a thread-safe per-caption LRU cache; subclasses encode misses."""

    dim: int
    name: str
    kind: str

    def __init__(self, max_length: int, device: str, cache_size: int, null_prompt: str = "") -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        if not isinstance(null_prompt, str):
            raise TypeError(f"null_prompt must be a string, got {type(null_prompt).__name__}")
        self.max_length = int(max_length)
        self.null_prompt = null_prompt
        self.device = torch.device(device)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, max_length={self.max_length}, "
            f"null_prompt={self.null_prompt!r})"
        )

    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 states (B, L, dim), int64 mask (B, L)) on CPU, padded positions zeroed."""
        raise NotImplementedError

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
        """The fixed CFG null embedding: this encoder's null prompt (`model.null_prompt`), batch 1."""
        return self.encode([self.null_prompt])

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


@contextmanager
def offline_quiet_loading() -> Iterator[None]:
    """Local files only (a stray hub lookup would hang an offline worker), no per-worker progress bars."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # after the offline variables above: huggingface_hub reads them when it is first imported
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 103-line "Loading weights" bar per worker is noise
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
