"""Caption -> text-encoder states as a Ray Data stage: a callable class run on an actor pool.

Each actor loads the encoder once (the expensive part: 22M parameters here, 7B for the 20B model) and
then serves batches. ``compact=True`` emits each row's valid tokens only, as bytes, for the embedding
cache; ``refs`` (a CaptionRefs) publishes each distinct caption's states once and gives rows a
``text_ref`` (twinflow.data.caption_refs: what streaming uses); otherwise rows get fixed-length
``text_states`` (L, dim) float32 and ``text_mask`` (L) int64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from twinflow.data.bad_records import BadRecord
from twinflow.data.caption_refs import REF_COLUMN, caption_key, pack
from twinflow.data.config import DataConfig


class TextEmbedStage:
    def __init__(
        self,
        text_column: str = "caption",
        max_length: int = 32,
        model_dir: str | None = None,
        device: str = "cpu",
        lru_size: int = 4096,
        compact: bool = False,
        cache_dtype: str = "float16",
        tracker: Any = None,
        refs: Any = None,
    ) -> None:
        # torch loads in the encoder actor only; Ray Data's decode tasks import this module too
        from twinflow.models.text_encoder import text_encoder_for_dir

        self.encoder = text_encoder_for_dir(model_dir, max_length, device, lru_size)
        self.text_column, self.compact = text_column, compact
        self.cache_dtype = np.dtype(cache_dtype)
        self.tracker = tracker  # reports rows without text when nothing upstream filtered them
        self.refs, self._published = refs, set()

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, pa.Table):
            return self._call_arrow(batch)
        return self._call_numpy(batch)

    def _bad_rows(self, texts: list[Any], ids: list[Any]) -> np.ndarray:
        """Mask of rows with usable text; the others are reported (or refused without a tracker)."""
        keep = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool)
        if not keep.all():
            bad = [
                BadRecord("empty_caption", str(ids[i]), f"empty {self.text_column}")
                for i in np.flatnonzero(~keep)
            ]
            if self.tracker is None:
                raise ValueError(f"{len(bad)} rows without {self.text_column} reached the text encoder")
            self.tracker.report(bad)
        return keep

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        enc = self.encoder.encode([str(t) for t in texts])
        states = enc["text_states"].cpu().numpy().astype(np.float32, copy=False)
        mask = enc["text_mask"].cpu().numpy().astype(np.int64, copy=False)
        return states, mask

    def _compact(self, states: np.ndarray, mask: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        lengths = mask.sum(axis=1)
        blobs = [states[i, :n].astype(self.cache_dtype).tobytes() for i, n in enumerate(lengths)]
        return blobs, lengths.astype(np.int32)

    def _call_arrow(self, table: pa.Table) -> pa.Table:
        texts = table.column(self.text_column).to_pylist()
        keep = self._bad_rows(texts, table.column("id").to_pylist())
        if not keep.all():
            table = table.filter(pa.array(keep))
            texts = [t for t, k in zip(texts, keep) if k]
        states, mask = self._encode(texts)
        if self.compact:
            blobs, lengths = self._compact(states, mask)
            return table.append_column("text_states", pa.array(blobs, pa.binary())).append_column(
                "text_len", pa.array(lengths, pa.int32())
            )
        raise ValueError("padded text states need batch_format='numpy'")

    def _call_numpy(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch[self.text_column]
        keep = self._bad_rows(list(texts), list(batch.get("id", range(len(texts)))))
        if not keep.all():
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
            texts = batch[self.text_column]
        if self.refs and not self.compact:
            return self._by_reference(batch, [str(t) for t in texts])
        states, mask = self._encode(list(texts))
        out = dict(batch)
        if self.compact:
            blobs, lengths = self._compact(states, mask)
            out["text_states"] = np.array(blobs, dtype=object)
            out["text_len"] = lengths
        else:
            out["text_states"] = states
            out["text_mask"] = mask
        return out

    def _by_reference(self, batch: dict[str, np.ndarray], texts: list[str]) -> dict[str, np.ndarray]:
        """Rows get their caption's key; captions this actor has not published yet are encoded and
        stored in the table first (so a row never arrives before its states)."""
        keys = [caption_key(t) for t in texts]
        new = {k: t for k, t in zip(keys, texts) if k not in self._published}
        if new:
            states, mask = self._encode(list(new.values()))
            self.refs.publish(dict(zip(new, pack(states, mask))))
            self._published.update(new)
        return {**batch, REF_COLUMN: np.array(keys, dtype=object)}


def embed_kwargs(cfg: DataConfig, **extra: Any) -> dict[str, Any]:
    """`TextEmbedStage`'s constructor arguments for a data config (plus `extra`)."""
    return {
        "text_column": cfg.text_column,
        "max_length": cfg.text_max_length,
        "model_dir": cfg.text_encoder_dir,
        "device": cfg.embed_device,
        "lru_size": cfg.embed_lru_size,
        **extra,
    }
