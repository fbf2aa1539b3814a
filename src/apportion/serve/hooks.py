"""What the server tells observers of each request (metrics, the dashboard, logs plug in here).

An observer's methods are called inline on the event loop, once per request, so they must be
quick and must not block; one that raises is logged and skipped, never failing the request.
``request_finished`` comes for every request to the completion routes, refused ones included
(their status says why, their spend is zero); ``request_started`` only for those admitted to run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from apportion.budget.units import Budget, Spend

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "refused", "failed", "cancelled")
"""ok: answered (status 200); refused: a 4xx before or instead of running; failed: the backend or
the server failed (5xx, or an error event in a stream); cancelled: the client went away."""


@dataclass(frozen=True, slots=True)
class RequestStarted:
    request_id: str
    route: str
    """"chat" or "completions"."""
    algorithm: str | None
    """The registry's name; None for a plain backend call."""
    budget: Budget
    """What the run may spend: the request's budget within the server's and the key's limits and its quota grant."""
    key_id: str | None
    stream: bool


@dataclass(frozen=True, slots=True)
class RequestFinished:
    request_id: str
    route: str
    algorithm: str | None
    key_id: str | None
    stream: bool
    status: int
    """The HTTP status sent (a stream that failed after it began still says 200; ``outcome`` tells)."""
    outcome: str
    """One of ``OUTCOMES``."""
    latency_s: float
    spent: Spend = field(default_factory=Spend)
    budget: Budget | None = None
    error: str | None = None


class RequestObserver(Protocol):
    def request_started(self, event: RequestStarted) -> None: ...

    def request_finished(self, event: RequestFinished) -> None: ...


def notify_started(observers: Sequence[RequestObserver], event: RequestStarted) -> None:
    for observer in observers:
        try:
            observer.request_started(event)
        except Exception:
            log.exception("request observer %r failed on request_started", observer)


def notify_finished(observers: Sequence[RequestObserver], event: RequestFinished) -> None:
    for observer in observers:
        try:
            observer.request_finished(event)
        except Exception:
            log.exception("request observer %r failed on request_finished", observer)
