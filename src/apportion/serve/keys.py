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

The parts: ``key_records`` (what is stored, what a period has left, the words of messages),
``key_database`` (what a driver provides, the pool of connection threads, the tables, rows as
records), ``key_store`` (``KeyStore``); this module opens a store, and its names are imported from
here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from apportion.serve.key_database import Connection, Database, Tx
from apportion.serve.key_records import (
    DAY_S,
    HELD_RETRY_S,
    KeyNotFound,
    KeyRecord,
    KeySpec,
    KeyStoreError,
    KeyUsage,
    QuotaStoreOptions,
    UnknownReservation,
    format_usd,
    iso,
    parse_max_request,
    parse_period,
    parse_usd,
    period_word,
)
from apportion.serve.key_store import SECRET_PREFIX, KeyStore, utc_now

__all__ = [
    "DAY_S",
    "HELD_RETRY_S",
    "SECRET_PREFIX",
    "Connection",
    "Database",
    "KeyNotFound",
    "KeyRecord",
    "KeySpec",
    "KeyStore",
    "KeyStoreError",
    "KeyUsage",
    "QuotaStoreOptions",
    "Tx",
    "UnknownReservation",
    "default_db_path",
    "format_usd",
    "is_postgres_url",
    "iso",
    "open_key_store",
    "parse_max_request",
    "parse_period",
    "parse_usd",
    "period_word",
    "utc_now",
]


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
