"""Checks of a key store that every database must pass (SQLite in the unit tests, a real PostgreSQL
in the integration tests): quotas exact under concurrency, across two stores on one database as two
server replicas would be, and open reservations charged after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from fractions import Fraction

from apportion.serve.keys import KeySpec, KeyStore, QuotaStoreOptions
from apportion.serve.quota_contract import Charge, QuotaExceeded

OpenStore = Callable[[QuotaStoreOptions], Awaitable[KeyStore]]

K = 1000  # tokens of the key's quota
WANT = 7  # 200 requests want 1400 tokens: the quota runs out mid-burst
USD = Fraction(3, 10_000)
REQUESTS = 200


async def check_concurrent_holds(open_store: OpenStore) -> None:
    """200 concurrent reservations held at once: together they are granted exactly K tokens
    (142 of 7, one of the last 6, the rest refused), then settle for exactly what they report."""
    a = await open_store(QuotaStoreOptions(owner="replica-a"))
    b = await open_store(QuotaStoreOptions(owner="replica-b"))
    try:
        _, secret = await a.create_key(KeySpec("holds", tokens=K, usd=Fraction(1, 10)))
        key = await b.authenticate(secret)

        async def reserve(i: int) -> Charge | None:
            try:
                return await (a if i % 2 else b).reserve(key, f"hold-{i}", Charge(WANT, USD, 1))
            except QuotaExceeded as exc:
                # every grant is still open here: what is left is held by requests in flight, not spent
                assert exc.quota == "tokens" and "tokens left are held by" in str(exc) and exc.retry_after_s == 1.0
                return None

        grants = await asyncio.gather(*(reserve(i) for i in range(REQUESTS)))
        granted = {i: g for i, g in enumerate(grants) if g is not None}
        assert sum(g.tokens for g in granted.values()) == K  # exact to the token, never more
        assert sorted(g.tokens for g in granted.values()).count(WANT) == K // WANT
        assert len(granted) == K // WANT + 1 and min(g.tokens for g in granted.values()) == K % WANT
        assert all(g.usd == USD and g.requests == 1 for g in granted.values())
        held = await a.usage("holds")
        assert (held.held.tokens, held.held.usd, held.open_reservations) == (K, USD * len(granted), len(granted))
        assert held.tokens_left == 0

        spent = {i: Charge(g.tokens - i % 3, g.usd * Fraction(i % 4, 3))
                 for i, g in granted.items()}  # thirds of a grant: exact only with exact arithmetic
        await asyncio.gather(*((b if i % 2 else a).settle(f"hold-{i}", s) for i, s in spent.items()))
        after = await b.usage("holds")
        assert after.spent.tokens == sum(s.tokens for s in spent.values())
        assert after.spent.usd == sum((s.usd for s in spent.values()), Fraction(0))
        assert (after.held.tokens, after.held.usd, after.open_reservations) == (0, 0, 0)
        assert after.spent.requests == len(granted)
        assert after.tokens_left == K - after.spent.tokens
    finally:
        await a.aclose()
        await b.aclose()


async def check_concurrent_reserve_settle(open_store: OpenStore) -> None:
    """200 concurrent requests, each reserving then settling what it was granted, on two replicas:
    what they were granted in all is exactly the quota, and what they settled is what was charged."""
    a = await open_store(QuotaStoreOptions(owner="replica-a"))
    b = await open_store(QuotaStoreOptions(owner="replica-b"))
    try:
        _, secret = await a.create_key(KeySpec("burst", tokens=K))
        key = await a.authenticate(secret)
        refused = 0

        async def request(i: int) -> int:
            nonlocal refused
            store = a if i % 2 else b
            try:
                grant = await store.reserve(key, f"burst-{i}", Charge(WANT, USD, 1))
            except QuotaExceeded:
                refused += 1
                return 0
            assert 0 < grant.tokens <= WANT and grant.usd == USD  # no dollar quota: all of it
            await asyncio.sleep(0)
            await store.settle(f"burst-{i}", Charge(grant.tokens, grant.usd))
            return grant.tokens

        granted = await asyncio.gather(*(request(i) for i in range(REQUESTS)))
        assert sum(granted) == K and refused == REQUESTS - sum(1 for g in granted if g)
        usage = await b.usage("burst")
        assert usage.spent.tokens == K and usage.held.tokens == 0 and usage.open_reservations == 0
        assert usage.spent.usd == USD * (REQUESTS - refused)
        assert usage.spent.requests == REQUESTS - refused
    finally:
        await a.aclose()
        await b.aclose()


async def check_restart_recovers(open_store: OpenStore) -> None:
    """A server killed mid-request (its reservation never settled) restarts: ``recover`` charges the
    open reservation at its grant, and usage shows it."""
    options = QuotaStoreOptions(owner="server-1")
    store = await open_store(options)
    _, secret = await store.create_key(KeySpec("restart", tokens=1000, usd=Fraction(1, 2)))
    key = await store.authenticate(secret)
    grant = await store.reserve(key, "in-flight", Charge(300, Fraction(1, 100), 1))
    await store.reserve(key, "finished", Charge(100, Fraction(1, 100), 1))
    await store.settle("finished", Charge(40, Fraction(1, 300)))
    await store.aclose()  # killed: "in-flight" is never settled

    store = await open_store(options)
    try:
        before = await store.usage("restart")
        assert (before.held.tokens, before.open_reservations) == (300, 1)  # the reservation was persisted
        assert await store.recover() == 1
        after = await store.usage("restart")
        assert after.spent.tokens == grant.tokens + 40 == 340
        assert after.spent.usd == Fraction(1, 100) + Fraction(1, 300)
        assert (after.held.tokens, after.held.usd, after.open_reservations, after.spent.requests) == (0, 0, 0, 2)
        assert after.tokens_left == 660
        assert await store.recover() == 0  # charged once
    finally:
        await store.aclose()
