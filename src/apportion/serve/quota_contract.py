"""What the server asks of a store of API keys and quotas (``serve/keys.py`` keeps them in SQLite
or PostgreSQL).

A key's quota is a long-lived ledger with the same reserve/settle protocol as a run's: before a
request runs, the server asks ``reserve`` for the most the request may spend, and the store grants
at most what the key has left in the current period (never less than the request asked for
silently: the server turns the grant into the request's own token and dollar limits, so the run's
ledger cannot spend past it). The reservation is persisted before ``reserve`` returns, so a
server killed mid-request finds it on restart and ``recover`` charges it at its grant (the worst
case). ``settle`` replaces a reservation by what the request really spent (never more than the
grant). Reserving is atomic across requests and server replicas: two requests never both spend
the same remaining quota.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from typing import Protocol

from apportion.budget.units import Budget
from apportion.errors import ApportionError


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount against a quota: total tokens (input + output), exact dollars, requests."""

    tokens: int = 0
    usd: Fraction = Fraction(0)
    requests: int = 0


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    """The stored key's identifier (never the secret)."""
    name: str
    max_request: Budget | None = None
    """The largest budget one request may ask for: a request's limits are capped by it."""


class InvalidKey(ApportionError):
    """No key, an unknown key, or a revoked one (HTTP 401)."""


class QuotaStoreFailed(ApportionError):
    """The store could not answer (its database unreachable or locked past its timeout): HTTP 503."""


class QuotaExceeded(ApportionError):
    """A quota has nothing left for this request (HTTP 429). The message says which quota and when it resets."""

    def __init__(self, message: str, *, quota: str, resets_at: datetime | None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.quota = quota
        self.resets_at = resets_at
        self.retry_after_s = retry_after_s
        """Sooner than the reset: what is left is only held by requests in flight, back when they settle."""


class QuotaStore(Protocol):
    async def authenticate(self, secret: str) -> KeyInfo:
        """The key whose secret this is; ``InvalidKey`` for an unknown or revoked one (a revoked key stops at once)."""
        ...

    async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
        """Reserve up to ``want`` (one request, its most tokens and dollars) against the key's quotas in the
        current period, persisted before returning. Returns the grant: ``want`` cut down to what is left
        (tokens and dollars; a key without a quota in a unit grants all of it). ``QuotaExceeded`` when a
        quota has nothing left, or the requests quota is used up."""
        ...

    async def settle(self, request_id: str, spent: Charge) -> None:
        """Replace the reservation by what the request spent (at most its grant; more is charged and kept)."""
        ...

    async def recover(self) -> int:
        """Charge every reservation left open by a server that stopped mid-request at its grant; how many."""
        ...

    async def aclose(self) -> None: ...


class LazyQuotaStore:
    """A store opened on first use, in the event loop that uses it (a server's loop is not the one
    its command line starts in, and database connections belong to one loop)."""

    def __init__(self, open_store: Callable[[], Awaitable[QuotaStore]]) -> None:
        self._open = open_store
        self._store: QuotaStore | None = None
        self._lock: asyncio.Lock | None = None

    async def store(self) -> QuotaStore:
        if self._store is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._store is None:
                    self._store = await self._open()
        return self._store

    async def authenticate(self, secret: str) -> KeyInfo:
        return await (await self.store()).authenticate(secret)

    async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
        return await (await self.store()).reserve(key, request_id, want)

    async def settle(self, request_id: str, spent: Charge) -> None:
        await (await self.store()).settle(request_id, spent)

    async def recover(self) -> int:
        return await (await self.store()).recover()

    async def aclose(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            await store.aclose()
