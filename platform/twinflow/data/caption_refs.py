"""Text states by reference: each distinct caption's states cross the object store once.

Streaming used to attach every row's padded states (L x dim float32: 24 KiB at L=16, dim=384) to the
row, so a 38k-image epoch pushed ~2 GiB of copies of a few captions through the object store, which
spilled. The embedding stage now publishes each caption's states once (valid tokens, float32: the
values training got before, bit for bit) to a small named actor per dataset and gives rows a
`text_ref` (the caption's key); the training worker's collate function turns refs back into the
usual `text_states`/`text_mask`, keeping what it fetched.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import ray

from twinflow.data.config import DataConfig
from twinflow.data.decode import unpack_states

REF_COLUMN = "text_ref"
DTYPE = "float32"


class CaptionTable:
    """Ray actor body: caption key -> (valid-token states as float32 bytes, token count)."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[bytes, int]] = {}

    def add(self, entries: dict[str, tuple[bytes, int]]) -> int:
        for key, value in entries.items():
            self.states.setdefault(key, value)
        return len(self.states)

    def get(self, keys: list[str]) -> dict[str, tuple[bytes, int]]:
        return {k: self.states[k] for k in keys if k in self.states}


# Non-detached actors die with their last handle: the driver keeps one per table for the session.
_LIVE_TABLES: dict[str, Any] = {}


def table_name(cfg: DataConfig) -> str:
    """One table per data config (the encoder, max_length and text column decide the states)."""
    return "twinflow-captions-" + hashlib.sha1(cfg.model_dump_json().encode()).hexdigest()[:16]


def open_table(name: str):
    """The named table actor (created on first use, on the driver that builds the dataset)."""
    handle = ray.remote(num_cpus=0)(CaptionTable).options(name=name, get_if_exists=True).remote()
    _LIVE_TABLES[name] = handle
    return handle


def caption_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def pack(states: np.ndarray, mask: np.ndarray) -> list[tuple[bytes, int]]:
    """(n, L, dim) padded states and (n, L) masks -> each row's valid tokens as bytes."""
    lengths = mask.sum(axis=1).astype(int)
    return [(states[i, :n].astype(DTYPE).tobytes(), int(n)) for i, n in enumerate(lengths)]


class CaptionRefs:
    """Picklable resolver for the train workers' collate: refs -> padded float32 states and masks."""

    def __init__(self, name: str, max_length: int) -> None:
        self.name, self.max_length = name, max_length
        self._known: dict[str, tuple[bytes, int]] = {}
        self._actor = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["max_length"])

    def resolve(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = sorted({k for k in keys if k not in self._known})
        if missing:
            if self._actor is None:
                self._actor = _LIVE_TABLES.get(self.name) or ray.get_actor(self.name)
            self._known.update(ray.get(self._actor.get.remote(missing)))
            lost = [k for k in missing if k not in self._known]
            if lost:
                raise KeyError(f"caption table {self.name} has no states for {len(lost)} caption(s)")
        rows = [unpack_states(*self._known[k], self.max_length, DTYPE) for k in keys]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
