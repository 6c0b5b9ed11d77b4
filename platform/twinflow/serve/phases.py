"""Where a replica's request time goes, summed over requests: `/v1/stats` shows it and the benchmark
prints it per request: at 1 NFE the fixed per-request costs, not the model, set throughput.

Phases, in the order a request meets them:

- parse: route entered to request queued (auth, body, JSON, validation, limits);
- queue_wait: queued to taken into a compute turn (Serve's batch wait and the previous turn);
- handoff: a turn's wall time not spent in the engine (the torch thread hop, the multiplexed model lookup);
- assembly, model, encoding: the engine's batch work (noise and text states; sampling; PNG bytes);
- response: turn finished to response built (waking the request, headers or JSON).

Per-request phases add one value per request; the turn phases add one value per compute turn, so
their sums divided by the requests are each request's share of the batch's work.
"""

from __future__ import annotations

PHASES = ("parse", "queue_wait", "handoff", "assembly", "model", "encoding", "response")


class PhaseTotals:
    """Milliseconds per phase, summed, with the number of requests and compute turns they cover."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(PHASES, 0.0)
        self.requests = 0
        self.turns = 0

    def add(self, name: str, ms: float) -> None:
        self.ms[name] += ms

    def snapshot(self) -> dict:
        return {
            "requests": self.requests,
            "turns": self.turns,
            "ms": {k: round(v, 3) for k, v in self.ms.items()},
        }


def per_request(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each phase between two snapshots (e.g. one benchmark run)."""
    n = after["requests"] - before["requests"]
    if n <= 0:
        return {}
    out = {k: round((after["ms"][k] - before["ms"][k]) / n, 3) for k in PHASES}
    out["requests_per_turn"] = round(n / max(1, after["turns"] - before["turns"]), 2)
    return out
