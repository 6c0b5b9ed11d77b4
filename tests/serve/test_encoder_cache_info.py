"""The replica's encoder cache figures (the metrics endpoint reads them) add up every caption length's
encoder: one LRU each, counted together. The process shares encoders by settings: a cache size no
other test uses keeps other tests' counts apart, and the test counts what its own calls added."""

from __future__ import annotations

from .helpers import TEXT_LEN


def test_cache_info_adds_up_the_encoders_of_every_caption_length():
    from twinflow.serve.engine import TextEncoders

    enc = TextEncoders(cache_size=7)
    short, long = TEXT_LEN, TEXT_LEN + 4
    enc.get(short), enc.get(long)
    before = enc.cache_info()
    enc.encode(["cache sum: a dress", "cache sum: a bag"], short)  # 2 misses
    enc.encode(["cache sum: a dress"], short)  # 1 hit
    enc.encode(["cache sum: a shoe"], long)  # the other encoder: 1 miss
    enc.encode(["cache sum: a shoe", "cache sum: a shoe"], long)  # 2 hits
    after = enc.cache_info()
    assert after["hits"] - before["hits"] == 3 and after["misses"] - before["misses"] == 3
    assert after["capacity"] == 7
