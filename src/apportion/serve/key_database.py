"""The database side of a key store: what a driver provides (``quota_sqlite``, ``quota_postgres``:
a connection and its transactions, ``Tx``), the store's pool of threads each with its own
connection, the tables, and rows read back as records."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, TypeVar

from apportion.budget.units import Budget
from apportion.serve.key_records import KeyNotFound, KeyRecord, KeyStoreError, KeyUsage, QuotaStoreOptions, _at
from apportion.serve.quota_contract import Charge

_SCHEMA_VERSION = "1"

T = TypeVar("T")


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


class _Connections:
    """The store's own small pool of threads, each with its own connection: the drivers block, and
    the event loop never waits on the database."""

    def __init__(self, database: Database, options: QuotaStoreOptions) -> None:
        self._db = database
        self.options = options
        self._executor = ThreadPoolExecutor(max_workers=self.options.connections, thread_name_prefix="apportion-keys")
        self._local = threading.local()
        self._connections: list[Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False

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

    def submit(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        if self._closed:
            raise KeyStoreError(f"key store {self._db.describe()} is closed")
        return asyncio.get_running_loop().run_in_executor(self._executor, self._in_thread, work)

    async def call(self, work: Callable[[Connection], T]) -> T:
        # Shielded: a transaction under way finishes in its thread whatever happens to the caller.
        return await asyncio.shield(self.submit(work))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


# -- the tables -----------------------------------------------------------------------------------


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


# -- rows as records ------------------------------------------------------------------------------


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
