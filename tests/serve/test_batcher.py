"""The replica's request queue without Ray: turns take what is queued up to the image budget, wait for
requests still arriving but not for nothing, skip cancelled requests, and never strand a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from twinflow.serve.batcher import Batcher


@dataclass
class It:
    name: str
    weight: int = 1


class Recorder:
    def __init__(self, delay: float = 0.0, fail: str | None = None) -> None:
        self.turns: list[list[str]] = []
        self.delay, self.fail = delay, fail

    async def __call__(self, take) -> None:
        self.turns.append([it.name for it, _ in take])
        await asyncio.sleep(self.delay)
        if self.fail in self.turns[-1]:
            raise RuntimeError("boom")
        for it, fut in take:
            if not fut.done():
                fut.set_result(it.name.upper())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_lone_request_does_not_wait_out_the_window():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_weight=16, wait_s=5.0)
        windows: list[float] = []  # every wait for more requests the batcher starts (idle waits are None)
        idle_or_window = b._sleep

        async def sleep(timeout):
            if timeout is not None:
                windows.append(timeout)
            await idle_or_window(timeout)

        b._sleep = sleep
        assert await b.submit(It("a")) == "A"
        return windows, rec.turns

    windows, turns = run(main())
    assert turns == [["a"]] and windows == []  # served at once: no window was waited


def test_a_turn_waits_for_arriving_requests_and_respects_the_image_budget():
    async def main():
        rec = Recorder(delay=0.01)
        b = Batcher(rec, max_weight=4, wait_s=5.0)

        async def route(name, weight, parse_s):
            with b.arriving_request():
                await asyncio.sleep(parse_s)  # reading and validating the body
            return await b.submit(It(name, weight))

        out = await asyncio.gather(
            route("a", 1, 0.0), route("b", 2, 0.02), route("c", 1, 0.04), route("d", 3, 0.06)
        )
        return out, rec.turns

    out, turns = run(main())
    assert out == ["A", "B", "C", "D"]
    # a waits for b and c (still arriving) until 4 images are queued; d does not fit and runs next
    assert turns == [["a", "b", "c"], ["d"]]


def test_requests_queued_during_a_turn_share_the_next_one():
    async def main():
        rec = Recorder(delay=0.05)
        b = Batcher(rec, max_weight=16, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(It("a")))
        await asyncio.sleep(0.01)  # a's turn is running
        rest = [asyncio.ensure_future(b.submit(It(n))) for n in "bcd"]
        await asyncio.gather(first, *rest)
        return rec.turns

    assert run(main()) == [["a"], ["b", "c", "d"]]


def test_unbatched_takes_one_request_per_turn():
    async def main():
        rec = Recorder(delay=0.01)
        b = Batcher(rec, max_weight=1, wait_s=1.0)
        await asyncio.gather(*(b.submit(It(n, 1)) for n in "abc"))
        return rec.turns

    assert run(main()) == [["a"], ["b"], ["c"]]


def test_cancelled_requests_are_skipped_and_errors_reach_every_request():
    async def main():
        rec = Recorder(delay=0.05, fail="x")
        b = Batcher(rec, max_weight=16, wait_s=0.0)
        first = asyncio.ensure_future(b.submit(It("a")))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(b.submit(It("gone")))
        kept = asyncio.ensure_future(b.submit(It("kept")))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, kept)
        bad = asyncio.ensure_future(b.submit(It("x")))
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        assert await b.submit(It("after")) == "AFTER"  # the queue survives a failed turn
        return rec.turns

    assert run(main()) == [["a"], ["kept"], ["x"], ["after"]]
