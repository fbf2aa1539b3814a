"""The key store's SQLite file: one connection per thread, ``BEGIN IMMEDIATE`` for every change."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from apportion.serve.keys import Tx


class _SQLiteTx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._conn.execute(sql, tuple(params)).rowcount


class _SQLiteConnection:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Tx]:
        # IMMEDIATE takes the write lock before the first read: a deferred transaction that read a
        # quota and then tried to write could fail (SQLITE_BUSY) when another process wrote first.
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _SQLiteTx(self._conn)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()


class SQLiteDatabase:
    """An SQLite file; several processes (a server and ``apportion keys``) may open it at once."""

    lock_row: str = ""  # BEGIN IMMEDIATE holds the whole file's write lock already
    errors: tuple[type[Exception], ...] = (sqlite3.Error,)
    schema_lock: str | None = None

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return str(self.path)

    def connect(self, timeout_s: float) -> _SQLiteConnection:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Readable by its owner only: it holds no secret, but it holds who may spend what.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        # isolation_level=None: the transactions above are the only ones (no implicit BEGIN).
        conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        try:
            # WAL: readers (authenticate) never wait on a writer; NORMAL: a commit survives the
            # process being killed (only a power cut can lose the last ones).
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return _SQLiteConnection(conn)
