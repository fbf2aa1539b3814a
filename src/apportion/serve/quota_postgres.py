"""The key store in PostgreSQL (psycopg 3, ``pip install 'apportion[serve]'``): replicas of a server
share quotas; each change locks only its key's period row (``SELECT ... FOR UPDATE``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from apportion.errors import ConfigError
from apportion.serve.keys import Tx

if TYPE_CHECKING:
    import psycopg


class _PostgresTx:
    def __init__(self, cursor: psycopg.Cursor[Any]) -> None:
        self._cursor = cursor

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]  # built from constants
        return self._cursor.fetchall() if self._cursor.description is not None else []

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        self._cursor.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
        return self._cursor.rowcount


class _PostgresConnection:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Tx]:
        with self._conn.transaction(), self._conn.cursor() as cursor:
            yield _PostgresTx(cursor)

    def close(self) -> None:
        self._conn.close()


class PostgresDatabase:
    lock_row: str = " FOR UPDATE"
    # Replicas starting together create the tables in turn (CREATE ... IF NOT EXISTS races otherwise).
    schema_lock: str | None = "SELECT pg_advisory_xact_lock(7146190871)"

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise ConfigError("a PostgreSQL key store needs psycopg: pip install 'apportion[serve]'") from None
        self._psycopg = psycopg
        self.errors: tuple[type[Exception], ...] = (psycopg.Error,)
        self.url = url

    def describe(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        return f"postgresql://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"  # never the password

    def connect(self, timeout_s: float) -> _PostgresConnection:
        # autocommit: each `transaction()` block is exactly one transaction, nothing left open between calls.
        conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(timeout_s)))
        return _PostgresConnection(conn)
