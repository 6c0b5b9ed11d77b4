"""The replica's request queue: concurrent requests become compute turns of up to `max_weight` images.

Plain asyncio, no Ray. Why not `@serve.batch`: Serve's batch forms as soon as its wait ends, so
during a forward the next arrivals become many small batches, and every batch waits out its window
even when nothing else is coming (a lone request pays the full 2 ms). Here one task
per replica runs the turns. A turn takes everything queued, up to `max_weight` images. It waits up to
`wait_s` for more only while other requests are still arriving, that is, inside a route between
entering it and queueing (reading the body, validating). A lone request starts at once, and under
load a turn fills while the previous one runs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Awaitable, Callable, Iterator

Entry = tuple[Any, asyncio.Future]  # (item with a `.weight`, the future its route awaits)


class Batcher:
    """`submit(item)` queues an item and returns what `compute` set on its future. `compute(entries)`
    must resolve every future it is given (a result or an exception) and should not raise."""

    def __init__(
        self, compute: Callable[[list[Entry]], Awaitable[None]], max_weight: int, wait_s: float
    ) -> None:
        self.compute, self.max_weight, self.wait_s = compute, max(1, int(max_weight)), float(wait_s)
        self.pending: collections.deque[Entry] = collections.deque()
        self.arriving = 0  # requests inside a route that will submit soon
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def arriving_request(self) -> Iterator[None]:
        """Wrap a route's work before `submit`, so a turn waits for it (up to wait_s) to join."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            self._poke()

    async def submit(self, item: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._poke()
        return await fut  # a cancelled route cancels its future; the turn then skips the item

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _weight(self) -> int:
        return sum(it.weight for it, f in self.pending if not f.done())

    def _take(self) -> list[Entry]:
        take, weight = [], 0
        while self.pending:
            it, fut = self.pending[0]
            if fut.done():  # cancelled while queued
                self.pending.popleft()
                continue
            if take and weight + it.weight > self.max_weight:
                break
            take.append(self.pending.popleft())
            weight += it.weight
        return take

    async def _sleep(self, timeout: float | None) -> None:
        assert self._wake is not None
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while True:
            if not self._weight():
                self.pending.clear()
                await self._sleep(None)
                continue
            deadline = loop.time() + self.wait_s
            while self.arriving and self._weight() < self.max_weight and loop.time() < deadline:
                await self._sleep(deadline - loop.time())
            take = self._take()
            if not take:
                continue
            try:
                await self.compute(take)
            except Exception as exc:  # compute should resolve its futures; never strand a request
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(exc)
