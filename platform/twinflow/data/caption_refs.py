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
from twinflow.data.tracking import on_driver_node

REF_COLUMN = "text_ref"
DTYPE = "float32"
NAMESPACE = "twinflow"  # looked up from Ray Data's actors and Train's workers alike


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
    """The named table actor (created on first use, on the driver that builds the dataset). The first
    handle is kept: a later lookup's handle would not keep the actor alive once the first is dropped."""
    if name in _LIVE_TABLES:
        return _LIVE_TABLES[name]
    actor = ray.remote(num_cpus=0)(CaptionTable)
    handle = actor.options(name=name, namespace=NAMESPACE, get_if_exists=True, **on_driver_node()).remote()
    _LIVE_TABLES[name] = handle
    return handle


def caption_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def pack(states: np.ndarray, mask: np.ndarray) -> list[tuple[bytes, int]]:
    """(n, L, dim) padded states and (n, L) masks -> each row's valid tokens as bytes."""
    lengths = mask.sum(axis=1).astype(int)
    return [(states[i, :n].astype(DTYPE).tobytes(), int(n)) for i, n in enumerate(lengths)]


class CaptionRefs:
    """Picklable access to one table: the embedding stage publishes through it (with the handle the
    driver gave it) and the train workers' collate resolves refs into padded float32 states and masks
    (finding the table by name)."""

    def __init__(self, name: str, max_length: int, actor: Any = None) -> None:
        self.name, self.max_length = name, max_length
        self._known: dict[str, tuple[bytes, int]] = {}
        self._actor = actor

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length, "actor": self._actor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["max_length"], state["actor"])

    def table(self):
        if self._actor is None:
            self._actor = _LIVE_TABLES.get(self.name) or ray.get_actor(self.name, namespace=NAMESPACE)
        return self._actor

    def publish(self, entries: dict[str, tuple[bytes, int]]) -> None:
        """Store captions' states; returns once the table has them (a row never outruns its states)."""
        ray.get(self.table().add.remote(entries))

    def resolve(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        missing = sorted({k for k in keys if k not in self._known})
        if missing:
            self._known.update(ray.get(self.table().get.remote(missing)))
            lost = [k for k in missing if k not in self._known]
            if lost:
                raise KeyError(f"caption table {self.name} has no states for {len(lost)} caption(s)")
        rows = [unpack_states(*self._known[k], self.max_length, DTYPE) for k in keys]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
