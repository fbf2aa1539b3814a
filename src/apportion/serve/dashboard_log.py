"""The dashboard's request log: ``RequestLog`` is the ``RequestObserver`` behind
``/dashboard/api/requests`` and ``/dashboard/api/spend``: a ring buffer of finished requests, the
requests in flight, and one tally per key and per algorithm, all bounded (keys are the store's,
algorithms the registry's; error texts are cut short)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from apportion.errors import ConfigError
from apportion.serve.hooks import OUTCOMES, RequestFinished, RequestStarted

_ERROR_CHARS = 300
"""Error texts kept per request: they may quote a client's input, which can be a megabyte."""


@dataclass(slots=True)
class Tally:
    """Requests and what they spent, for one key, one algorithm, or all."""

    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    generations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Fraction = Fraction(0)
    latency_s: float = 0.0

    def add(self, event: RequestFinished) -> None:
        self.requests += 1
        self.outcomes[event.outcome] = self.outcomes.get(event.outcome, 0) + 1
        self.generations += event.spent.generations
        self.input_tokens += event.spent.input_tokens
        self.output_tokens += event.spent.output_tokens
        self.usd += event.spent.usd
        self.latency_s += event.latency_s

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, **self.outcomes, "generations": self.generations,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens, "usd": float(self.usd),
                "mean_latency_s": round(self.latency_s / self.requests, 6) if self.requests else None}


@dataclass(frozen=True, slots=True)
class _Live:
    event: RequestStarted
    at: float
    """Wall-clock time it started (for the page); ``since`` the monotonic one (for its age)."""
    since: float


@dataclass(frozen=True, slots=True)
class _Done:
    event: RequestFinished
    at: float


class RequestLog:
    """A ``RequestObserver`` keeping what the dashboard shows, in bounded memory: the requests in
    flight, the last ``recent`` finished ones, and a tally per key and per algorithm.

    Observers are called on the server's event loop, but a snapshot may be taken from any thread
    (an app embedding the server, a test), so a lock guards the state: each call holds it for
    microseconds."""

    def __init__(self, recent: int = 100, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if recent < 1:
            raise ConfigError(f"the request log keeps at least 1 finished request, not {recent}")
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._in_flight: dict[str, _Live] = {}
        self._recent: deque[_Done] = deque(maxlen=recent)
        self._finished = 0
        self._total = Tally()
        self._by_key: dict[str | None, Tally] = {}
        self._by_algorithm: dict[str | None, Tally] = {}
        self._since = clock()

    @property
    def capacity(self) -> int:
        return self._recent.maxlen or 0

    def request_started(self, event: RequestStarted) -> None:
        with self._lock:
            self._in_flight[event.request_id] = _Live(event, self._clock(), self._monotonic())

    def request_finished(self, event: RequestFinished) -> None:
        if event.error is not None and len(event.error) > _ERROR_CHARS:
            event = _shortened(event)
        with self._lock:
            self._in_flight.pop(event.request_id, None)
            self._recent.append(_Done(event, self._clock()))
            self._finished += 1
            self._total.add(event)
            self._by_key.setdefault(event.key_id, Tally()).add(event)
            self._by_algorithm.setdefault(event.algorithm, Tally()).add(event)

    def requests(self) -> dict[str, Any]:
        """``/dashboard/api/requests``: in flight (oldest first), then the recent finished (newest first)."""
        with self._lock:
            now = self._monotonic()
            live = sorted(self._in_flight.values(), key=lambda x: x.since)
            in_flight = [{**_identity(x.event), "budget": x.event.budget.limits(), "started_at": _iso(x.at),
                          "elapsed_s": round(now - x.since, 3)} for x in live]
            recent = [_finished(x) for x in reversed(self._recent)]
            return {"in_flight": in_flight, "recent": recent, "capacity": self.capacity,
                    "finished_total": self._finished}

    def spend(self) -> dict[str, Any]:
        """``/dashboard/api/spend``: the tallies since the server started, dearest first."""
        with self._lock:
            return {"since": _iso(self._since), "total": self._total.to_dict(),
                    "by_key": [{"key_id": k, **t.to_dict()} for k, t in _dearest(self._by_key)],
                    "by_algorithm": [{"algorithm": a, **t.to_dict()} for a, t in _dearest(self._by_algorithm)]}


def _shortened(event: RequestFinished) -> RequestFinished:
    assert event.error is not None
    return RequestFinished(event.request_id, event.route, event.algorithm, event.key_id, event.stream, event.status,
                           event.outcome, event.latency_s, event.spent, event.budget,
                           event.error[:_ERROR_CHARS] + "…")


def _identity(event: RequestStarted | RequestFinished) -> dict[str, Any]:
    return {"request_id": event.request_id, "route": event.route, "algorithm": event.algorithm,
            "key_id": event.key_id, "stream": event.stream}


def _finished(done: _Done) -> dict[str, Any]:
    e = done.event
    spent = e.spent
    return {**_identity(e), "status": e.status, "outcome": e.outcome, "latency_s": round(e.latency_s, 6),
            "finished_at": _iso(done.at), "budget": e.budget.limits() if e.budget is not None else None,
            "spent": {"generations": spent.generations, "input_tokens": spent.input_tokens,
                      "output_tokens": spent.output_tokens, "total_tokens": spent.total_tokens,
                      "usd": float(spent.usd)},
            "error": e.error}


def _dearest(tallies: dict[str | None, Tally]) -> list[tuple[str | None, Tally]]:
    return sorted(tallies.items(), key=lambda kv: (-kv[1].usd, -(kv[1].input_tokens + kv[1].output_tokens),
                                                   -kv[1].requests, kv[0] or ""))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
