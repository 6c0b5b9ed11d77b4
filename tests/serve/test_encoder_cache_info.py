"""The replica's encoder cache figures (the metrics endpoint reads them) add up every caption length's
encoder: one LRU each, counted together."""

from __future__ import annotations

from .helpers import TEXT_LEN


def test_cache_info_adds_up_the_encoders_of_every_caption_length():
    from twinflow.serve.engine import TextEncoders

    enc = TextEncoders(cache_size=8)
    enc.encode(["a photo of a dress", "a photo of a bag"], TEXT_LEN)  # 2 misses
    enc.encode(["a photo of a dress"], TEXT_LEN)  # 1 hit
    enc.encode(["a photo of a shoe"], TEXT_LEN + 4)  # another encoder: 1 miss
    enc.encode(["a photo of a shoe", "a photo of a shoe"], TEXT_LEN + 4)  # 2 hits
    assert enc.cache_info() == {"size": 3, "capacity": 8, "hits": 3, "misses": 3}
