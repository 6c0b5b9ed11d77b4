"""Serve reliability without Ray: a failing request fails alone inside its batch (defect 5); request
bodies are bounded in time, concurrency and nesting, and strict about JSON (defects 6 and 7)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from twinflow.serve import app as app_module
from twinflow.serve.body import BodyReaders, nesting_depth, parse_json
from twinflow.serve.engine import Item, Result
from twinflow.serve.phases import PhaseTotals
from twinflow.serve.schemas import ApiError, GenerateRequest


def _replica():
    """A TwinFlow replica object without Serve: only what a compute turn touches."""
    cls = app_module.TwinFlow.func_or_class
    rep = cls.__new__(cls)
    rep.pool = ThreadPoolExecutor(max_workers=1)
    rep.encoders = None
    rep.batch_sizes = {}
    rep.phases = PhaseTotals()

    async def get_model(model_id):
        return object()

    rep.get_model = get_model
    return rep


def fake_run_items(models, encoders, items, phases=None):
    """Fails the whole call when any prompt is 'BAD' (as a tokenizer error on one prompt would)."""
    if any(it.prompt == "BAD" for it in items):
        raise UnicodeEncodeError("utf-8", "BAD", 0, 1, "surrogates not allowed")
    return [Result([it.prompt.encode()], 1.0, len(items), len(items), len(items)) for it in items]


def test_one_bad_request_fails_alone_in_its_batch(monkeypatch):
    rep = _replica()
    # Serve's ingress rebuilds the class with its own copy of the module globals: patch those
    monkeypatch.setitem(type(rep)._sample.__globals__, "run_items", fake_run_items)

    async def turn():
        loop = asyncio.get_running_loop()
        take = [(Item("m", p, 1, 0), loop.create_future()) for p in ["a", "b", "BAD", "c", "d"]]
        await rep._compute(take)
        return take

    take = asyncio.run(turn())
    outcomes = {it.prompt: (f.exception() if f.exception() else f.result()) for it, f in take}
    assert isinstance(outcomes.pop("BAD"), UnicodeEncodeError)
    assert {p: r.pngs[0] for p, r in outcomes.items()} == {p: p.encode() for p in "abcd"}


@pytest.mark.parametrize(
    "raw,kind",
    [
        (b'{"prompt": "a", "guidance": Infinity}', "malformed_json"),
        (b'{"prompt": "a", "guidance": NaN}', "malformed_json"),
        (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
        (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "malformed_json"),
    ],
)
def test_non_finite_constants_and_deep_nesting_are_400(raw, kind):
    with pytest.raises(ApiError) as err:
        parse_json(raw, max_depth=32)
    assert err.value.status == 400 and err.value.type == kind
    json.dumps(err.value.body(), allow_nan=False)


def test_depth_scan_ignores_brackets_in_strings_and_passes_normal_bodies():
    assert nesting_depth(b'{"p": "[[[[{{{{\\"]]]", "x": [1, [2]]}') == 3
    body = json.dumps({"prompt": "[" * 500, "image": "A" * 10_000}).encode()
    assert parse_json(body, max_depth=4)["prompt"] == "[" * 500


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"prompt": "a", "guidance": 1e309}, "guidance"),
        ({"prompt": "a", "model": ""}, "model"),
    ],
)
def test_values_that_cannot_round_trip_are_422_with_a_json_body(body, field):
    from pydantic import ValidationError

    from twinflow.serve.schemas import validation_details

    data = json.loads(json.dumps(body))  # 1e309 -> inf, \ud800 -> a lone surrogate: what json.loads gives
    with pytest.raises(ValidationError) as err:
        GenerateRequest.model_validate(data)
    details = validation_details(err.value)
    assert [field] in [d["loc"] for d in details]
    json.dumps(ApiError(422, "invalid_request", "x", details).body(), allow_nan=False)


async def _trickle(n_bytes: int, every_s: float):
    for _ in range(n_bytes):
        await asyncio.sleep(every_s)
        yield b"{"


def test_a_slow_body_times_out_with_408():
    readers = BodyReaders(max_readers=4, timeout_s=0.3, max_bytes=1000)

    async def go():
        return await readers.read(_trickle(100, 0.05), "100")

    with pytest.raises(ApiError) as err:
        asyncio.run(go())
    assert err.value.status == 408 and readers.active == 0


def test_readers_beyond_the_cap_get_503_at_once():
    readers = BodyReaders(max_readers=2, timeout_s=5, max_bytes=1000)

    async def go():
        slow = [asyncio.create_task(readers.read(_trickle(10, 0.1), "10")) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ApiError) as err:
            await readers.read(_trickle(1, 0), "1")
        assert err.value.status == 503 and err.value.headers == {"Retry-After": "1"}
        done = await asyncio.gather(*slow)
        assert done == [b"{" * 10] * 2 and readers.active == 0

    asyncio.run(go())
