"""API keys and their quotas, kept in SQLite (a file: the default) or PostgreSQL (shared by replicas).

``KeyStore`` implements ``quota_contract.QuotaStore`` over either database; ``quota_sqlite`` and
``quota_postgres`` only say how to connect and open a transaction, so the quota arithmetic exists
once. Choices, and why:

- Secrets are never stored: a key row holds HMAC-SHA256(pepper, secret), the pepper drawn once per
  store. A secret is 192 random bits, so a plain hash could not be reversed either; the pepper
  makes a leaked table useless against any other store's. The hash is a unique column, so finding a
  key is one index lookup.
- Dollars are exact: a ``Fraction`` written as its text (``"3/20000000"``) and added in Python
  under the row's lock. Integer micro-dollars would round a price per token, and a numerator and
  denominator in 64-bit columns could overflow on long sums of mixed prices.
- The trace is bounded: one row per key per period holds the totals (spent, held by open
  reservations, requests, top-ups); a reservation's row lives from ``reserve`` to ``settle``.
  Rows of periods older than ``keep_days`` are dropped, and so are recovered reservations.
- Every change is one short transaction that locks the key's period row first: ``BEGIN
  IMMEDIATE`` in SQLite (one writer at a time, across processes), ``SELECT ... FOR UPDATE`` in
  PostgreSQL (requests of other keys go on in parallel). Two requests never both spend what is left.
- The drivers block, so every call runs in the store's own small pool of threads, each with its
  own connection (the event loop never waits on the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from apportion.budget.units import Budget
from apportion.errors import ApportionError, BudgetError, ConfigError
from apportion.serve.quota_contract import Charge, InvalidKey, KeyInfo, QuotaExceeded, QuotaStore, QuotaStoreFailed

SECRET_PREFIX = "ap-"
DAY_S = 86_400
_SCHEMA_VERSION = "1"
_KEY_ID_PREFIX = "key_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_PERIOD = re.compile(r"(\d+)\s*([smhdw]?)")
_PERIOD_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY_S, "w": 7 * DAY_S}
_PERIOD_WORDS = {60: "minute", 3600: "hour", DAY_S: "day", 7 * DAY_S: "week"}

T = TypeVar("T")


class KeyNotFound(ApportionError):
    """No key has this name or id."""


class UnknownReservation(ApportionError):
    """``settle`` of a request id with no reservation: never reserved, or already settled."""


class KeyStoreError(QuotaStoreFailed):
    """The database failed (unreachable, locked past the timeout, not a key store)."""


# -- what is stored -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySpec:
    """A key to create: its name, its quotas per period (None: unlimited in that unit), the largest
    budget one request may ask for, and its period (seconds, aligned to the Unix epoch: a day runs
    from 00:00 UTC)."""

    name: str
    tokens: int | None = None
    usd: Fraction | None = None
    requests: int | None = None
    max_request: Budget | None = None
    period_s: int = DAY_S

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name) or self.name.startswith(_KEY_ID_PREFIX):
            raise ConfigError(f"key name {self.name!r} must be 1-64 letters, digits, '.', '_', '@' or '-', "
                              f"start with a letter or digit, and not start with {_KEY_ID_PREFIX!r} (ids do)")
        for unit in ("tokens", "requests"):
            value = getattr(self, unit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{unit} per period must be a whole number > 0, got {value!r}")
        if self.usd is not None and (not isinstance(self.usd, Fraction) or self.usd <= 0):
            raise ConfigError(f"dollars per period must be a Fraction > 0, got {self.usd!r}")
        if isinstance(self.period_s, bool) or not isinstance(self.period_s, int) or self.period_s <= 0:
            raise ConfigError(f"a key's period must be a whole number of seconds > 0, got {self.period_s!r}")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A stored key as ``keys list`` shows it (never the secret)."""

    key_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    period_s: int
    tokens: int | None
    usd: Fraction | None
    requests: int | None
    max_request: Budget | None

    @property
    def info(self) -> KeyInfo:
        return KeyInfo(key_id=self.key_id, name=self.name, max_request=self.max_request)


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """A key's current period: what settled requests spent, what open reservations hold, the
    top-ups added to its allowance, and when it resets."""

    key: KeyRecord
    period_start: datetime
    resets_at: datetime
    spent: Charge
    """Tokens and dollars of settled (and recovered) requests; ``requests``: every admitted request."""
    held: Charge
    """What the open reservations were granted (``requests``: how many are open)."""
    top_up: Charge

    @property
    def open_reservations(self) -> int:
        return self.held.requests

    @property
    def tokens_left(self) -> int | None:
        if self.key.tokens is None:
            return None
        return self.key.tokens + self.top_up.tokens - self.spent.tokens - self.held.tokens

    @property
    def usd_left(self) -> Fraction | None:
        return None if self.key.usd is None else self.key.usd + self.top_up.usd - self.spent.usd - self.held.usd

    @property
    def requests_left(self) -> int | None:
        return None if self.key.requests is None else self.key.requests + self.top_up.requests - self.spent.requests


@dataclass(frozen=True, slots=True)
class QuotaStoreOptions:
    """How a ``KeyStore`` runs.

    ``owner`` names this server among the replicas sharing a database: ``recover`` charges the open
    reservations of its own owner (left by its previous run) and anyone's older than
    ``stale_after_s`` (a replica that never came back), never a live replica's request in flight.
    Give each replica a stable name of its own; the default, the host name, suits one server per host.
    """

    owner: str = field(default_factory=socket.gethostname)
    connections: int = 4
    """Threads, each with its own connection: how many database calls run at once."""
    keep_days: int = 90
    """Period rows and recovered reservations older than this are dropped."""
    stale_after_s: float = 6 * 3600
    timeout_s: float = 30.0
    """Longest wait for a connection or a lock held by another process."""

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ConfigError(f"a key store needs at least 1 connection, got {self.connections}")
        if self.keep_days < 1:
            raise ConfigError(f"keep_days must be >= 1, got {self.keep_days}")
        if not self.stale_after_s > 0 or not self.timeout_s > 0:
            raise ConfigError("stale_after_s and timeout_s must be > 0")


# -- what a database provides ---------------------------------------------------------------------


class Tx(Protocol):
    """One transaction. SQL uses ``?`` placeholders whatever the driver's."""

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run a statement; the number of rows it changed."""
        ...


class Connection(Protocol):
    def transaction(self, write: bool) -> AbstractContextManager[Tx]:
        """A transaction, committed when the block ends and rolled back on an exception. ``write``:
        it will change rows (SQLite takes the write lock at once, so two never deadlock upgrading)."""
        ...

    def close(self) -> None: ...


class Database(Protocol):
    lock_row: str
    """Appended to a SELECT of a row the transaction will change: ``" FOR UPDATE"`` where rows are
    locked one by one, ``""`` where the transaction already holds the database's write lock."""
    errors: tuple[type[Exception], ...]
    """The driver's exceptions, reported as ``KeyStoreError``."""
    schema_lock: str | None
    """A statement run first in the schema's transaction so replicas starting together take turns."""

    def connect(self, timeout_s: float) -> Connection: ...

    def describe(self) -> str:
        """Where the keys are, for messages (never a password)."""
        ...


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS apportion_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS apportion_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, secret_hash TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL, revoked_at BIGINT, period_s BIGINT NOT NULL,
        tokens_limit BIGINT, usd_limit TEXT, requests_limit BIGINT, max_request TEXT)""",
    """CREATE TABLE IF NOT EXISTS apportion_periods (
        key_id TEXT NOT NULL REFERENCES apportion_keys (id), period BIGINT NOT NULL,
        spent_tokens BIGINT NOT NULL DEFAULT 0, spent_usd TEXT NOT NULL DEFAULT '0',
        held_tokens BIGINT NOT NULL DEFAULT 0, held_usd TEXT NOT NULL DEFAULT '0',
        requests BIGINT NOT NULL DEFAULT 0, open_reservations BIGINT NOT NULL DEFAULT 0,
        extra_tokens BIGINT NOT NULL DEFAULT 0, extra_usd TEXT NOT NULL DEFAULT '0',
        extra_requests BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (key_id, period))""",
    """CREATE TABLE IF NOT EXISTS apportion_reservations (
        request_id TEXT PRIMARY KEY, key_id TEXT NOT NULL REFERENCES apportion_keys (id),
        period BIGINT NOT NULL, tokens BIGINT NOT NULL, usd TEXT NOT NULL, owner TEXT NOT NULL,
        state TEXT NOT NULL, created_at BIGINT NOT NULL, closed_at BIGINT)""",
    "CREATE INDEX IF NOT EXISTS apportion_reservations_state ON apportion_reservations (state, owner)",
)
_KEY_COLUMNS = "id, name, created_at, revoked_at, period_s, tokens_limit, usd_limit, requests_limit, max_request"
_TOTAL_COLUMNS = ("spent_tokens, spent_usd, held_tokens, held_usd, requests, open_reservations, "
                  "extra_tokens, extra_usd, extra_requests")


@dataclass(frozen=True, slots=True)
class _Totals:
    """A key's period row."""

    spent_tokens: int = 0
    spent_usd: Fraction = Fraction(0)
    held_tokens: int = 0
    held_usd: Fraction = Fraction(0)
    requests: int = 0
    open_reservations: int = 0
    extra_tokens: int = 0
    extra_usd: Fraction = Fraction(0)
    extra_requests: int = 0

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> _Totals:
        st, su, ht, hu, rq, op, et, eu, er = row
        return cls(int(st), Fraction(su), int(ht), Fraction(hu), int(rq), int(op), int(et), Fraction(eu), int(er))

    def params(self) -> tuple[object, ...]:
        return (self.spent_tokens, str(self.spent_usd), self.held_tokens, str(self.held_usd), self.requests,
                self.open_reservations, self.extra_tokens, str(self.extra_usd), self.extra_requests)


# -- the store ------------------------------------------------------------------------------------


def utc_now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    """API keys and their quotas in one database: a ``QuotaStore`` for the server and the key
    management of ``apportion keys``. Open one with ``open_key_store``; safe to share between any
    number of concurrent requests, and between processes on one database."""

    def __init__(self, database: Database, options: QuotaStoreOptions | None = None, *,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._db = database
        self.options = options or QuotaStoreOptions()
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=self.options.connections, thread_name_prefix="apportion-keys")
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._pepper = b""

    def describe(self) -> str:
        return self._db.describe()

    # -- plumbing --

    def _now(self) -> int:
        return int(self._clock().timestamp())

    def _in_thread(self, work: Callable[[Connection], T]) -> T:
        conn: Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._db.connect(self.options.timeout_s)
                self._local.conn = conn
                with self._connections_lock:
                    self._connections.append(conn)
            return work(conn)
        except self._db.errors as exc:
            if conn is not None:  # it may be broken (a database restarted): this thread's next call reconnects
                self._local.conn = None
                with self._connections_lock:
                    self._connections.remove(conn)
                with contextlib.suppress(*self._db.errors):
                    conn.close()
            raise KeyStoreError(f"key store {self._db.describe()}: {exc}".strip()) from exc

    def _submit(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        if self._closed:
            raise KeyStoreError(f"key store {self._db.describe()} is closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, self._in_thread, work)

    async def _call(self, work: Callable[[Connection], T]) -> T:
        # Shielded: a transaction under way finishes in its thread whatever happens to the caller.
        return await asyncio.shield(self._submit(work))

    async def _init(self) -> None:
        await self._call(self._init_tx)

    def _init_tx(self, conn: Connection) -> None:
        with conn.transaction(write=True) as tx:
            if self._db.schema_lock:
                tx.rows(self._db.schema_lock)
            for statement in _SCHEMA:
                tx.run(statement)
            tx.run("INSERT INTO apportion_meta (name, value) VALUES (?, ?), (?, ?) ON CONFLICT (name) DO NOTHING",
                   ("schema", _SCHEMA_VERSION, "pepper", secrets.token_hex(32)))
            meta = dict(tx.rows("SELECT name, value FROM apportion_meta"))
        if meta.get("schema") != _SCHEMA_VERSION:
            raise KeyStoreError(f"key store {self._db.describe()} has schema {meta.get('schema')!r}; "
                                f"this apportion reads schema {_SCHEMA_VERSION!r}")
        self._pepper = bytes.fromhex(meta["pepper"])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    def _hash(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    # -- keys --

    async def create_key(self, spec: KeySpec) -> tuple[KeyRecord, str]:
        """A new key and its secret (shown once: only its hash is stored)."""
        secret = SECRET_PREFIX + secrets.token_urlsafe(24)
        key_id = _KEY_ID_PREFIX + secrets.token_hex(8)
        now = self._now()

        def work(conn: Connection) -> None:
            with conn.transaction(write=True) as tx:
                taken = tx.rows("SELECT revoked_at FROM apportion_keys WHERE name = ?", (spec.name,))
                if taken:
                    state = " (revoked)" if taken[0][0] is not None else ""
                    raise ConfigError(f"a key named {spec.name!r} exists{state}; choose another name")
                tx.run(f"INSERT INTO apportion_keys ({_KEY_COLUMNS}, secret_hash) VALUES ({', '.join('?' * 10)})",
                       (key_id, spec.name, now, None, spec.period_s, spec.tokens,
                        None if spec.usd is None else str(spec.usd), spec.requests,
                        None if spec.max_request is None else str(spec.max_request), self._hash(secret)))

        await self._call(work)
        record = KeyRecord(key_id, spec.name, _at(now), None, spec.period_s, spec.tokens, spec.usd, spec.requests,
                           spec.max_request)
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        def work(conn: Connection) -> list[KeyRecord]:
            with conn.transaction(write=False) as tx:
                rows = tx.rows(f"SELECT {_KEY_COLUMNS} FROM apportion_keys ORDER BY created_at, name")
            return [_record(r) for r in rows]

        return await self._call(work)

    async def find_key(self, name_or_id: str) -> KeyRecord:
        def work(conn: Connection) -> KeyRecord:
            with conn.transaction(write=False) as tx:
                return _find(tx, name_or_id)

        return await self._call(work)

    async def revoke(self, name_or_id: str) -> tuple[KeyRecord, bool]:
        """Revoke a key: its next ``authenticate`` and ``reserve`` fail (open reservations still
        settle). The key, and whether this call revoked it (False: it already was)."""
        now = self._now()

        def work(conn: Connection) -> tuple[KeyRecord, bool]:
            with conn.transaction(write=True) as tx:
                record = _find(tx, name_or_id)
                if record.revoked_at is not None:
                    return record, False
                tx.run("UPDATE apportion_keys SET revoked_at = ? WHERE id = ?", (now, record.key_id))
                return replace(record, revoked_at=_at(now)), True

        return await self._call(work)

    async def usage(self, name_or_id: str) -> KeyUsage:
        """The key's current period."""
        now = self._now()

        def work(conn: Connection) -> KeyUsage:
            with conn.transaction(write=False) as tx:
                record = _find(tx, name_or_id)
                period = now // record.period_s
                rows = tx.rows(f"SELECT {_TOTAL_COLUMNS} FROM apportion_periods WHERE key_id = ? AND period = ?",
                               (record.key_id, period))
                return _usage(record, period, _Totals.from_row(rows[0]) if rows else _Totals())

        return await self._call(work)

    async def top_up(self, name_or_id: str, extra: Charge) -> KeyUsage:
        """Add to the current period's allowance (the next period starts from the key's quotas again).
        Only units the key limits can be topped up."""
        _check_charge(extra, "a top-up")
        if not (extra.tokens or extra.usd or extra.requests):
            raise ConfigError("a top-up needs tokens, dollars or requests > 0")
        now = self._now()

        def work(conn: Connection) -> KeyUsage:
            with conn.transaction(write=True) as tx:
                record = _find(tx, name_or_id)
                if record.revoked_at is not None:
                    raise ConfigError(f"key {record.name} ({record.key_id}) is revoked; a top-up would not be used")
                for unit, limit in (("tokens", record.tokens), ("usd", record.usd), ("requests", record.requests)):
                    if getattr(extra, unit) and limit is None:
                        raise ConfigError(f"key {record.name} has no {_UNIT_WORDS[unit]} quota (unlimited): "
                                          f"a top-up adds to a quota")
                period = now // record.period_s
                totals = self._lock_period(tx, record.key_id, period, record.period_s, now)
                totals = replace(totals, extra_tokens=totals.extra_tokens + extra.tokens,
                                 extra_usd=totals.extra_usd + extra.usd,
                                 extra_requests=totals.extra_requests + extra.requests)
                _write_period(tx, record.key_id, period, totals)
                return _usage(record, period, totals)

        return await self._call(work)

    # -- QuotaStore --

    async def authenticate(self, secret: str) -> KeyInfo:
        if not secret:
            raise InvalidKey("no API key: send 'Authorization: Bearer <key>'")
        digest = self._hash(secret)

        def work(conn: Connection) -> KeyInfo:
            with conn.transaction(write=False) as tx:
                rows = tx.rows(f"SELECT {_KEY_COLUMNS} FROM apportion_keys WHERE secret_hash = ?", (digest,))
            if not rows:
                raise InvalidKey("invalid API key")
            record = _record(rows[0])
            if record.revoked_at is not None:
                raise InvalidKey("this API key was revoked")
            return record.info

        return await self._call(work)

    async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
        """See ``QuotaStore.reserve``. A reservation is one request: ``want.requests`` may be 0 or 1
        and the grant's is 1; the request counts against the requests quota whatever it spends."""
        _check_charge(want, "a reservation")
        if want.requests > 1:
            raise ValueError(f"a reservation is one request, got requests={want.requests}")
        now = self._now()
        future = self._submit(lambda conn: self._reserve_tx(conn, key, request_id, want, now))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The transaction goes on in its thread. Had it granted, its reservation would hold quota
            # until a restart's recover charged it, for a request that will never run: give it back.
            try:
                await future
            except Exception:
                pass  # nothing was reserved
            else:
                await self._call(lambda conn: self._settle_tx(conn, request_id, Charge(), now))
            raise

    def _reserve_tx(self, conn: Connection, key: KeyInfo, request_id: str, want: Charge, now: int) -> Charge:
        with conn.transaction(write=True) as tx:
            rows = tx.rows(f"SELECT {_KEY_COLUMNS} FROM apportion_keys WHERE id = ?", (key.key_id,))
            if not rows or rows[0][3] is not None:
                raise InvalidKey("this API key was revoked" if rows else f"no key {key.key_id}")
            record = _record(rows[0])
            period = now // record.period_s
            totals = self._lock_period(tx, record.key_id, period, record.period_s, now)
            grant = _grant(_usage(record, period, totals), want)
            totals = replace(totals, held_tokens=totals.held_tokens + grant.tokens,
                             held_usd=totals.held_usd + grant.usd, requests=totals.requests + 1,
                             open_reservations=totals.open_reservations + 1)
            _write_period(tx, record.key_id, period, totals)
            added = tx.run("INSERT INTO apportion_reservations (request_id, key_id, period, tokens, usd, owner, state, "
                           "created_at) VALUES (?, ?, ?, ?, ?, ?, 'open', ?) ON CONFLICT (request_id) DO NOTHING",
                           (request_id, record.key_id, period, grant.tokens, str(grant.usd), self.options.owner, now))
            if not added:
                raise ValueError(f"request id {request_id!r} already has a reservation")  # rolls the grant back
            return grant

    async def settle(self, request_id: str, spent: Charge) -> None:
        """See ``QuotaStore.settle``: tokens and dollars are replaced by ``spent`` (more than the grant
        is charged); the request stays counted. A reservation that ``recover`` charged at its grant
        (its server seemed gone) is corrected to ``spent``. ``UnknownReservation`` for an id with none."""
        _check_charge(spent, "a settlement")
        now = self._now()
        await self._call(lambda conn: self._settle_tx(conn, request_id, spent, now))

    def _settle_tx(self, conn: Connection, request_id: str, spent: Charge, now: int) -> None:
        with conn.transaction(write=True) as tx:
            rows = tx.rows("SELECT key_id, period, tokens, usd, state FROM apportion_reservations WHERE request_id = ?"
                           + self._db.lock_row, (request_id,))
            if not rows:
                raise UnknownReservation(f"no reservation for request {request_id!r} (never reserved, or settled)")
            key_id, period, tokens, usd, state = rows[0]
            grant = Charge(int(tokens), Fraction(usd))
            tx.run("DELETE FROM apportion_reservations WHERE request_id = ?", (request_id,))
            period_s = tx.rows("SELECT period_s FROM apportion_keys WHERE id = ?", (key_id,))[0][0]
            totals = self._lock_period(tx, key_id, period, int(period_s), now)
            if state == "open":
                totals = replace(totals, held_tokens=totals.held_tokens - grant.tokens,
                                 held_usd=totals.held_usd - grant.usd, open_reservations=totals.open_reservations - 1)
            else:  # recovered: its grant was charged as spent
                spent = Charge(spent.tokens - grant.tokens, spent.usd - grant.usd)
            totals = replace(totals, spent_tokens=totals.spent_tokens + spent.tokens,
                             spent_usd=totals.spent_usd + spent.usd)
            _write_period(tx, key_id, period, totals)

    async def recover(self) -> int:
        """Charge at their grant the open reservations of this store's owner (its previous run
        stopped mid-request) and anyone's older than ``stale_after_s``; how many. A late ``settle``
        of one still corrects it."""
        now = self._now()
        stale = now - int(self.options.stale_after_s)

        def work(conn: Connection) -> int:
            with conn.transaction(write=False) as tx:
                ids = [r[0] for r in tx.rows("SELECT request_id FROM apportion_reservations WHERE state = 'open' "
                                             "AND (owner = ? OR created_at < ?)", (self.options.owner, stale))]
            charged = sum(self._recover_tx(conn, request_id, now) for request_id in ids)  # one short lock at a time
            with conn.transaction(write=True) as tx:
                tx.run("DELETE FROM apportion_reservations WHERE state = 'recovered' AND closed_at < ?",
                       (now - self.options.keep_days * DAY_S,))
            return charged

        return await self._call(work)

    def _recover_tx(self, conn: Connection, request_id: str, now: int) -> int:
        with conn.transaction(write=True) as tx:
            rows = tx.rows("SELECT key_id, period, tokens, usd FROM apportion_reservations "
                           "WHERE request_id = ? AND state = 'open'" + self._db.lock_row, (request_id,))
            if not rows:
                return 0  # settled meanwhile
            key_id, period, tokens, usd = rows[0]
            tx.run("UPDATE apportion_reservations SET state = 'recovered', closed_at = ? WHERE request_id = ?",
                   (now, request_id))
            period_s = tx.rows("SELECT period_s FROM apportion_keys WHERE id = ?", (key_id,))[0][0]
            totals = self._lock_period(tx, key_id, period, int(period_s), now)
            totals = replace(totals, held_tokens=totals.held_tokens - int(tokens),
                             held_usd=totals.held_usd - Fraction(usd), open_reservations=totals.open_reservations - 1,
                             spent_tokens=totals.spent_tokens + int(tokens), spent_usd=totals.spent_usd + Fraction(usd))
            _write_period(tx, key_id, period, totals)
            return 1

    def _lock_period(self, tx: Tx, key_id: str, period: int, period_s: int, now: int) -> _Totals:
        """The key's row for this period, created if new and locked until the transaction ends."""
        if tx.run("INSERT INTO apportion_periods (key_id, period) VALUES (?, ?) ON CONFLICT (key_id, period) "
                  "DO NOTHING", (key_id, period)):
            # A new period: the key's rows older than keep_days go (none an open reservation still needs).
            oldest = (now - self.options.keep_days * DAY_S) // period_s
            tx.run("DELETE FROM apportion_periods WHERE key_id = ? AND period < ? AND NOT EXISTS (SELECT 1 FROM "
                   "apportion_reservations r WHERE r.key_id = apportion_periods.key_id "
                   "AND r.period = apportion_periods.period AND r.state = 'open')", (key_id, oldest))
        rows = tx.rows(f"SELECT {_TOTAL_COLUMNS} FROM apportion_periods WHERE key_id = ? AND period = ?"
                       + self._db.lock_row, (key_id, period))
        return _Totals.from_row(rows[0])


if TYPE_CHECKING:
    _contract: type[QuotaStore] = KeyStore  # mypy checks that the store keeps the server's contract


def _write_period(tx: Tx, key_id: str, period: int, totals: _Totals) -> None:
    assignments = ", ".join(f"{c.strip()} = ?" for c in _TOTAL_COLUMNS.split(","))
    tx.run(f"UPDATE apportion_periods SET {assignments} WHERE key_id = ? AND period = ?",
           (*totals.params(), key_id, period))


def _find(tx: Tx, name_or_id: str) -> KeyRecord:
    rows = tx.rows(f"SELECT {_KEY_COLUMNS} FROM apportion_keys WHERE id = ? OR name = ?", (name_or_id, name_or_id))
    if not rows:
        raise KeyNotFound(f"no key named {name_or_id!r} (nor with that id); `apportion keys list` shows them")
    return _record(rows[0])


def _record(row: Sequence[Any]) -> KeyRecord:
    key_id, name, created, revoked, period_s, tokens, usd, requests, max_request = row
    return KeyRecord(key_id, name, _at(created), None if revoked is None else _at(revoked), int(period_s),
                     None if tokens is None else int(tokens), None if usd is None else Fraction(usd),
                     None if requests is None else int(requests),
                     None if max_request is None else Budget.parse(max_request))


def _usage(record: KeyRecord, period: int, totals: _Totals) -> KeyUsage:
    return KeyUsage(record, _at(period * record.period_s), _at((period + 1) * record.period_s),
                    spent=Charge(totals.spent_tokens, totals.spent_usd, totals.requests),
                    held=Charge(totals.held_tokens, totals.held_usd, totals.open_reservations),
                    top_up=Charge(totals.extra_tokens, totals.extra_usd, totals.extra_requests))


_UNIT_WORDS = {"tokens": "tokens", "usd": "dollars", "requests": "requests"}


def _grant(usage: KeyUsage, want: Charge) -> Charge:
    """``want`` cut down to what is left; ``QuotaExceeded`` where a limited unit has nothing left."""
    key = usage.key
    per = f"per {period_word(key.period_s)}"
    resets = f"resets at {iso(usage.resets_at)}"
    requests_left = usage.requests_left
    if requests_left is not None and requests_left <= 0:
        allowed = (key.requests or 0) + usage.top_up.requests
        raise QuotaExceeded(f"requests {per}: {usage.spent.requests} of {allowed} used; {resets}",
                            quota="requests", resets_at=usage.resets_at)
    tokens, usd = want.tokens, want.usd
    tokens_left, usd_left = usage.tokens_left, usage.usd_left
    if tokens_left is not None:
        if tokens_left <= 0:
            allowed = (key.tokens or 0) + usage.top_up.tokens
            if usage.spent.tokens < allowed:
                raise _held("tokens", per, f"the {allowed - usage.spent.tokens} tokens left", usage)
            raise QuotaExceeded(f"tokens {per}: 0 of {allowed} left; {resets}",
                                quota="tokens", resets_at=usage.resets_at)
        tokens = min(tokens, tokens_left)
    if usd_left is not None:
        if usd_left <= 0:
            allowed_usd = (key.usd or Fraction(0)) + usage.top_up.usd
            if usage.spent.usd < allowed_usd:
                raise _held("usd", per, f"the ${format_usd(allowed_usd - usage.spent.usd)} left", usage)
            raise QuotaExceeded(f"dollars {per}: $0 of ${format_usd(allowed_usd)} left; {resets}",
                                quota="usd", resets_at=usage.resets_at)
        usd = min(usd, usd_left)
    return Charge(tokens=tokens, usd=usd, requests=1)


HELD_RETRY_S = 1.0
"""How soon to ask again when what a quota has left is only held by requests in flight: they
settle what they did not spend within a request's time, not at the period's reset."""


def _held(quota: str, per: str, left: str, usage: KeyUsage) -> QuotaExceeded:
    unit = _UNIT_WORDS[quota]
    return QuotaExceeded(f"{unit} {per}: {left} are held by {usage.open_reservations} request(s) in flight; what "
                         "they do not spend comes back when they finish (retry shortly)",
                         quota=quota, resets_at=usage.resets_at, retry_after_s=HELD_RETRY_S)


def _check_charge(charge: Charge, what: str) -> None:
    if isinstance(charge.tokens, bool) or not isinstance(charge.tokens, int) or charge.tokens < 0:
        raise ValueError(f"{what}'s tokens must be a whole number >= 0, got {charge.tokens!r}")
    if not isinstance(charge.usd, (int, Fraction)) or isinstance(charge.usd, bool) or charge.usd < 0:
        raise ValueError(f"{what}'s dollars must be an exact Fraction >= 0, got {charge.usd!r}")
    if isinstance(charge.requests, bool) or not isinstance(charge.requests, int) or charge.requests < 0:
        raise ValueError(f"{what}'s requests must be a whole number >= 0, got {charge.requests!r}")


# -- opening a store, and the words of its messages ---------------------------------------------------


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/apportion/keys.db`` (``~/.local/share`` where XDG_DATA_HOME is unset or relative)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "apportion" / "keys.db"


def is_postgres_url(db: str | Path) -> bool:
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


async def open_key_store(db: str | Path | None = None, options: QuotaStoreOptions | None = None, *,
                         clock: Callable[[], datetime] = utc_now) -> KeyStore:
    """The key store at ``db``: a ``postgresql://`` URL, an SQLite file (a path or ``sqlite:///path``;
    created with its folder where missing), or the default file (``default_db_path``)."""
    database: Database
    if db is not None and is_postgres_url(db):
        from apportion.serve.quota_postgres import PostgresDatabase

        database = PostgresDatabase(str(db))
    else:
        from apportion.serve.quota_sqlite import SQLiteDatabase

        text = str(db) if db is not None else ""
        database = SQLiteDatabase(Path(text.removeprefix("sqlite://")).expanduser() if text else default_db_path())
    store = KeyStore(database, options, clock=clock)
    try:
        await store._init()
    except BaseException:
        await store.aclose()
        raise
    return store


def parse_period(text: str) -> int:
    """Seconds of ``"1d"``, ``"12h"``, ``"30m"``, ``"1w"`` or ``"3600"`` (seconds)."""
    match = _PERIOD.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) <= 0:
        raise ConfigError(f"a period is a whole number > 0 with s, m, h, d or w (e.g. 1d, 12h), got {text!r}")
    return int(match.group(1)) * _PERIOD_UNITS[match.group(2)]


def parse_usd(text: str) -> Fraction:
    """Exact dollars of ``"5"``, ``"0.10"`` or ``"1/3"`` (never through a float)."""
    try:
        value = Fraction(text.strip().removeprefix("$"))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"dollars must be a number such as 5 or 0.25, got {text!r}") from None
    if value <= 0:
        raise ConfigError(f"dollars must be > 0, got {text!r}")
    return value


def parse_max_request(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except BudgetError as exc:
        raise ConfigError(f"--max-request: {exc}") from None


def period_word(period_s: int) -> str:
    """``"day"`` for 86400 seconds; ``"12h"`` for a period without a word."""
    if period_s in _PERIOD_WORDS:
        return _PERIOD_WORDS[period_s]
    for suffix, size in (("w", 7 * DAY_S), ("d", DAY_S), ("h", 3600), ("m", 60)):
        if period_s % size == 0:
            return f"{period_s // size}{suffix}"
    return f"{period_s}s"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_usd(value: Fraction) -> str:
    """An exact decimal where the fraction has one (every decimal price gives one), else nine places and '≈'."""
    den, places = value.denominator, 0
    for prime in (2, 5):
        count = 0
        while den % prime == 0:
            den //= prime
            count += 1
        places = max(places, count)
    if den != 1:
        return f"≈{float(value):.9f}"
    scaled = value.numerator * 10**places // value.denominator
    sign, digits = ("-" if scaled < 0 else ""), str(abs(scaled)).rjust(places + 1, "0")
    whole, frac = digits[: len(digits) - places], digits[len(digits) - places:] if places else ""
    return sign + whole + (f".{frac}" if frac else "")


def _at(seconds: int) -> datetime:
    return datetime.fromtimestamp(int(seconds), UTC)

