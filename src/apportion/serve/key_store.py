"""``KeyStore``: keys and their quotas in one database (see ``keys`` for the choices), its reserve,
settle and recover each one short transaction run in the store's own pool of threads."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import TYPE_CHECKING

from apportion.errors import ConfigError
from apportion.serve.key_database import (
    _KEY_COLUMNS,
    _SCHEMA,
    _SCHEMA_VERSION,
    _TOTAL_COLUMNS,
    Connection,
    Database,
    Tx,
    _Connections,
    _find,
    _record,
    _Totals,
    _usage,
    _write_period,
)
from apportion.serve.key_records import (
    _KEY_ID_PREFIX,
    _UNIT_WORDS,
    DAY_S,
    KeyRecord,
    KeySpec,
    KeyStoreError,
    KeyUsage,
    QuotaStoreOptions,
    UnknownReservation,
    _at,
    _grant,
)
from apportion.serve.quota_contract import Charge, InvalidKey, KeyInfo, QuotaStore

SECRET_PREFIX = "ap-"


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
        self._pool = _Connections(database, self.options)
        self._pepper = b""

    def describe(self) -> str:
        return self._db.describe()

    # -- plumbing --

    def _now(self) -> int:
        return int(self._clock().timestamp())

    async def _init(self) -> None:
        await self._pool.call(self._init_tx)

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
        await self._pool.aclose()

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

        await self._pool.call(work)
        record = KeyRecord(key_id, spec.name, _at(now), None, spec.period_s, spec.tokens, spec.usd, spec.requests,
                           spec.max_request)
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        def work(conn: Connection) -> list[KeyRecord]:
            with conn.transaction(write=False) as tx:
                rows = tx.rows(f"SELECT {_KEY_COLUMNS} FROM apportion_keys ORDER BY created_at, name")
            return [_record(r) for r in rows]

        return await self._pool.call(work)

    async def find_key(self, name_or_id: str) -> KeyRecord:
        def work(conn: Connection) -> KeyRecord:
            with conn.transaction(write=False) as tx:
                return _find(tx, name_or_id)

        return await self._pool.call(work)

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

        return await self._pool.call(work)

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

        return await self._pool.call(work)

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

        return await self._pool.call(work)

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

        return await self._pool.call(work)

    async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
        """See ``QuotaStore.reserve``. A reservation is one request: ``want.requests`` may be 0 or 1
        and the grant's is 1; the request counts against the requests quota whatever it spends."""
        _check_charge(want, "a reservation")
        if want.requests > 1:
            raise ValueError(f"a reservation is one request, got requests={want.requests}")
        now = self._now()
        future = self._pool.submit(lambda conn: self._reserve_tx(conn, key, request_id, want, now))
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
                await self._pool.call(lambda conn: self._settle_tx(conn, request_id, Charge(), now))
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
        await self._pool.call(lambda conn: self._settle_tx(conn, request_id, spent, now))

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

        return await self._pool.call(work)

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


def _check_charge(charge: Charge, what: str) -> None:
    if isinstance(charge.tokens, bool) or not isinstance(charge.tokens, int) or charge.tokens < 0:
        raise ValueError(f"{what}'s tokens must be a whole number >= 0, got {charge.tokens!r}")
    if not isinstance(charge.usd, (int, Fraction)) or isinstance(charge.usd, bool) or charge.usd < 0:
        raise ValueError(f"{what}'s dollars must be an exact Fraction >= 0, got {charge.usd!r}")
    if isinstance(charge.requests, bool) or not isinstance(charge.requests, int) or charge.requests < 0:
        raise ValueError(f"{what}'s requests must be a whole number >= 0, got {charge.requests!r}")
