"""API keys and quotas in SQLite (``serve/keys.py``) and ``apportion keys``: secrets stored only
hashed, grants cut to what is left, refusals that name the quota and its reset, exact dollars,
periods and top-ups, reservations that survive a restart, and quotas exact under 200 concurrent
requests on two stores sharing one file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apportion.budget.units import Budget
from apportion.cli import app
from apportion.errors import ConfigError
from apportion.serve.keys import (
    KeyNotFound,
    KeySpec,
    KeyStore,
    KeyStoreError,
    QuotaStoreOptions,
    UnknownReservation,
    default_db_path,
    format_usd,
    open_key_store,
    parse_period,
    parse_usd,
    period_word,
)
from apportion.serve.quota_contract import Charge, InvalidKey, QuotaExceeded
from tests.support.quota_checks import check_concurrent_holds, check_concurrent_reserve_settle, check_restart_recovers

NOON = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
MIDNIGHT = "2026-11-27T00:00:00Z"


class Clock:
    """A clock the test moves."""

    def __init__(self, at: datetime = NOON) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


async def opened(db: Path, clock: Clock | None = None, **options: object) -> KeyStore:
    return await open_key_store(db, QuotaStoreOptions(**options), clock=clock or Clock())  # type: ignore[arg-type]


# -- keys ----------------------------------------------------------------------------------------------


async def test_a_secret_is_returned_once_and_stored_only_as_a_peppered_hash(db):
    store = await opened(db)
    record, secret = await store.create_key(KeySpec("alice", tokens=100))
    assert secret.startswith("ap-") and len(secret) == 35
    info = await store.authenticate(secret)
    assert (info.key_id, info.name) == (record.key_id, "alice") and info.key_id.startswith("key_")
    assert secret not in repr(await store.list_keys())
    await store.aclose()
    stored = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert secret.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() not in stored  # a hash with this store's pepper
    with sqlite3.connect(db) as raw:
        (digest,) = raw.execute("SELECT secret_hash FROM apportion_keys").fetchone()
    assert len(digest) == 64

    again = await opened(db)  # the pepper is the store's: a new process finds the same key
    assert (await again.authenticate(secret)).key_id == record.key_id
    await again.aclose()


async def test_no_key_a_wrong_key_and_a_revoked_key_are_refused_at_once(db):
    server, admin = await opened(db), await opened(db)  # a server and `apportion keys`, two processes
    _, secret = await admin.create_key(KeySpec("bob", tokens=1000))
    key = await server.authenticate(secret)
    with pytest.raises(InvalidKey, match="no API key"):
        await server.authenticate("")
    with pytest.raises(InvalidKey, match="invalid API key"):
        await server.authenticate(secret[:-1] + ("x" if secret[-1] != "x" else "y"))
    await server.reserve(key, "in-flight", Charge(10, Fraction(0), 1))
    record, changed = await admin.revoke("bob")
    assert changed and record.revoked_at == NOON
    with pytest.raises(InvalidKey, match="revoked"):
        await server.authenticate(secret)
    with pytest.raises(InvalidKey, match="revoked"):  # a key authenticated before the revoke is stopped too
        await server.reserve(key, "next", Charge(10, Fraction(0), 1))
    await server.settle("in-flight", Charge(7))  # a request in flight still settles
    assert (await admin.usage(record.key_id)).spent.tokens == 7
    assert (await admin.revoke(record.key_id))[1] is False
    await server.aclose()
    await admin.aclose()


async def test_key_names_are_unique_and_checked(db):
    store = await opened(db)
    carol, _ = await store.create_key(KeySpec("carol"))
    assert await store.find_key("carol") == carol == await store.find_key(carol.key_id)
    with pytest.raises(ConfigError, match="a key named 'carol' exists"):
        await store.create_key(KeySpec("carol", tokens=5))
    for bad in ("", "has space", "key_looks_like_an_id", "x" * 65, "-dash"):
        with pytest.raises(ConfigError, match="key name"):
            KeySpec(bad)
    with pytest.raises(ConfigError, match="tokens per period"):
        KeySpec("d", tokens=0)
    with pytest.raises(KeyNotFound, match="no key named 'nobody'"):
        await store.usage("nobody")
    await store.aclose()


# -- quotas --------------------------------------------------------------------------------------------


async def test_a_grant_is_cut_to_what_is_left_and_a_refusal_names_the_quota_and_its_reset(db):
    store = await opened(db)
    _, secret = await store.create_key(KeySpec("q", tokens=100, max_request=Budget.parse("gen=16,tokens=8000")))
    key = await store.authenticate(secret)
    assert key.max_request == Budget(generations=16, total_tokens=8000)
    assert await store.reserve(key, "r1", Charge(60, Fraction(1, 10), 1)) == Charge(60, Fraction(1, 10), 1)
    assert await store.reserve(key, "r2", Charge(60, Fraction(1, 10), 0)) == Charge(40, Fraction(1, 10), 1)
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(key, "r3", Charge(1, Fraction(0), 1))
    # everything left is held by r1 and r2, still in flight: back when they settle, not at midnight
    assert str(refused.value) == ("tokens per day: the 100 tokens left are held by 2 request(s) in flight; what "
                                  "they do not spend comes back when they finish (retry shortly)")
    assert refused.value.quota == "tokens" and refused.value.retry_after_s == 1.0
    assert refused.value.resets_at == datetime(2026, 11, 27, tzinfo=UTC)
    usage = await store.usage("q")
    assert (usage.held.tokens, usage.open_reservations, usage.spent.requests) == (100, 2, 2)  # r3 not counted
    await store.settle("r1", Charge(20, Fraction(1, 30)))
    assert await store.reserve(key, "r4", Charge(50, Fraction(0), 1)) == Charge(40, Fraction(0), 1)
    await store.settle("r2", Charge(40))
    await store.settle("r4", Charge(40))
    with pytest.raises(QuotaExceeded) as spent:  # all of it spent: now it is the reset that brings more
        await store.reserve(key, "r5", Charge(1, Fraction(0), 1))
    assert str(spent.value) == f"tokens per day: 0 of 100 left; resets at {MIDNIGHT}"
    assert spent.value.retry_after_s is None
    await store.aclose()


async def test_dollars_are_exact_and_their_quota_refuses_with_its_name(db):
    store = await opened(db)
    _, secret = await store.create_key(KeySpec("usd", usd=Fraction(1, 10)))
    key = await store.authenticate(secret)
    third = Fraction(1, 30)
    for i in range(3):
        assert (await store.reserve(key, f"u{i}", Charge(500, third, 1))).usd == third  # no token quota: all 500
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(key, "u3", Charge(1, Fraction(1, 10**9), 1))
    assert str(refused.value) == ("dollars per day: the $0.1 left are held by 3 request(s) in flight; what they do "
                                  "not spend comes back when they finish (retry shortly)")
    assert refused.value.quota == "usd"
    for i in range(3):
        await store.settle(f"u{i}", Charge(500, third / 7))
    usage = await store.usage("usd")
    assert usage.spent.usd == third * 3 / 7 and usage.usd_left == Fraction(1, 10) - third * 3 / 7  # no float drift
    assert usage.spent.tokens == 1500 and usage.tokens_left is None
    await store.reserve(key, "all", Charge(1, usage.usd_left, 1))
    await store.settle("all", Charge(1, usage.usd_left))
    with pytest.raises(QuotaExceeded, match=re.escape(f"dollars per day: $0 of $0.1 left; resets at {MIDNIGHT}")):
        await store.reserve(key, "u4", Charge(1, Fraction(1, 10**9), 1))
    await store.aclose()


async def test_the_requests_quota_counts_every_admitted_request(db):
    store = await opened(db)
    _, secret = await store.create_key(KeySpec("req", requests=2))
    key = await store.authenticate(secret)
    await store.reserve(key, "a", Charge(10, Fraction(0), 1))
    await store.settle("a", Charge(0))  # spent nothing: still a request
    await store.reserve(key, "b", Charge(10, Fraction(0), 1))
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(key, "c", Charge(10, Fraction(0), 1))
    assert str(refused.value) == f"requests per day: 2 of 2 used; resets at {MIDNIGHT}"
    assert refused.value.quota == "requests"
    with pytest.raises(ValueError, match="one request"):
        await store.reserve(key, "d", Charge(10, Fraction(0), 2))
    await store.aclose()


async def test_settling_more_than_the_grant_charges_it_and_unknown_or_repeated_ids_are_errors(db):
    store = await opened(db)
    _, secret = await store.create_key(KeySpec("over", tokens=100))
    key = await store.authenticate(secret)
    await store.reserve(key, "r", Charge(50, Fraction(0), 1))
    with pytest.raises(ValueError, match="already has a reservation"):
        await store.reserve(key, "r", Charge(50, Fraction(0), 1))
    assert (await store.usage("over")).held.tokens == 50  # the refused duplicate held nothing
    await store.settle("r", Charge(130))  # what happened is charged
    usage = await store.usage("over")
    assert (usage.spent.tokens, usage.held.tokens, usage.tokens_left) == (130, 0, -30)
    with pytest.raises(QuotaExceeded, match="tokens per day: 0 of 100 left"):
        await store.reserve(key, "s", Charge(1, Fraction(0), 1))
    with pytest.raises(UnknownReservation, match="'r'"):
        await store.settle("r", Charge(1))
    with pytest.raises(UnknownReservation, match="never"):
        await store.settle("never-reserved", Charge(1))
    with pytest.raises(ValueError, match="tokens must be a whole number"):
        await store.settle("x", Charge(-1))
    await store.aclose()


async def test_a_new_period_starts_afresh_and_a_top_up_lasts_its_period(db):
    clock = Clock()
    store = await opened(db, clock)
    _, secret = await store.create_key(KeySpec("daily", tokens=100, usd=Fraction(1), requests=10))
    key = await store.authenticate(secret)
    await store.reserve(key, "a", Charge(100, Fraction(0), 1))
    await store.settle("a", Charge(100))
    with pytest.raises(QuotaExceeded):
        await store.reserve(key, "b", Charge(1, Fraction(0), 1))
    topped = await store.top_up("daily", Charge(tokens=25, usd=Fraction(1, 4), requests=1))
    assert (topped.tokens_left, topped.usd_left, topped.requests_left) == (25, Fraction(5, 4), 10)
    assert await store.reserve(key, "b", Charge(40, Fraction(0), 1)) == Charge(25, Fraction(0), 1)
    with pytest.raises(QuotaExceeded, match="tokens per day: the 25 tokens left are held by 1 request"):
        await store.reserve(key, "c", Charge(1, Fraction(0), 1))

    clock.at = datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC)
    fresh = await store.usage("daily")
    assert fresh.period_start == datetime(2026, 11, 27, tzinfo=UTC)
    assert fresh.resets_at == datetime(2026, 11, 28, tzinfo=UTC)
    assert (fresh.spent.tokens, fresh.top_up.tokens, fresh.tokens_left) == (0, 0, 100)  # the top-up is gone
    assert await store.reserve(key, "d", Charge(40, Fraction(0), 1)) == Charge(40, Fraction(0), 1)
    await store.settle("b", Charge(20))  # reserved yesterday: charged to yesterday
    assert (await store.usage("daily")).spent.tokens == 0
    await store.aclose()


async def test_a_top_up_needs_a_quota_to_add_to(db):
    store = await opened(db)
    await store.create_key(KeySpec("tok", tokens=10))
    with pytest.raises(ConfigError, match="no dollars quota"):
        await store.top_up("tok", Charge(usd=Fraction(1)))
    with pytest.raises(ConfigError, match="needs tokens, dollars or requests"):
        await store.top_up("tok", Charge())
    await store.revoke("tok")
    with pytest.raises(ConfigError, match="revoked"):
        await store.top_up("tok", Charge(tokens=5))
    await store.aclose()


async def test_a_key_period_is_its_own(db):
    clock = Clock(datetime(2026, 11, 26, 12, 30, tzinfo=UTC))
    store = await opened(db, clock)
    _, secret = await store.create_key(KeySpec("hourly", tokens=10, period_s=parse_period("1h")))
    key = await store.authenticate(secret)
    await store.reserve(key, "a", Charge(10, Fraction(0), 1))
    await store.settle("a", Charge(10))
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(key, "b", Charge(1, Fraction(0), 1))
    assert str(refused.value) == "tokens per hour: 0 of 10 left; resets at 2026-11-26T13:00:00Z"
    clock.at += timedelta(minutes=30)
    assert (await store.reserve(key, "b", Charge(3, Fraction(0), 1))).tokens == 3
    await store.aclose()


# -- reservations ----------------------------------------------------------------------------------------


async def test_a_restarted_server_charges_the_reservations_it_left_open(db):
    await check_restart_recovers(lambda options: opened(db, **options_dict(options)))


async def test_recover_leaves_a_live_replica_alone_until_its_reservations_are_stale(db):
    clock = Clock()
    live, restarted = await opened(db, clock, owner="a"), await opened(db, clock, owner="b", stale_after_s=3600)
    _, secret = await live.create_key(KeySpec("shared", tokens=1000))
    key = await live.authenticate(secret)
    await live.reserve(key, "a-1", Charge(200, Fraction(0), 1))
    assert await restarted.recover() == 0  # replica a is serving it
    clock.at += timedelta(hours=2)
    assert await restarted.recover() == 1  # older than any request runs: a never came back
    assert (await live.usage("shared")).spent.tokens == 200
    await live.settle("a-1", Charge(70))  # it did come back: what it really spent replaces the worst case
    usage = await live.usage("shared")
    assert (usage.spent.tokens, usage.held.tokens, usage.open_reservations) == (70, 0, 0)
    with pytest.raises(UnknownReservation):
        await live.settle("a-1", Charge(70))
    await live.aclose()
    await restarted.aclose()


async def test_a_request_cancelled_while_reserving_holds_nothing(db):
    store = await opened(db)
    _, secret = await store.create_key(KeySpec("cancel", tokens=100))
    key = await store.authenticate(secret)
    task = asyncio.create_task(store.reserve(key, "gone", Charge(60, Fraction(0), 1)))
    await asyncio.sleep(0)  # the transaction is under way in its thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    usage = await store.usage("cancel")
    assert (usage.held.tokens, usage.open_reservations, usage.tokens_left) == (0, 0, 100)
    with pytest.raises(UnknownReservation):
        await store.settle("gone", Charge(1))
    await store.aclose()


async def test_the_trace_is_bounded_old_periods_and_recovered_reservations_are_dropped(db):
    clock = Clock()
    store = await opened(db, clock, owner="s", keep_days=3)
    _, secret = await store.create_key(KeySpec("long", tokens=100))
    key = await store.authenticate(secret)
    for day in range(10):
        clock.at = NOON + timedelta(days=day)
        for i in range(5):
            await store.reserve(key, f"{day}-{i}", Charge(10, Fraction(0), 1))
            if i < 4:
                await store.settle(f"{day}-{i}", Charge(5))
        assert await store.recover() == 1  # the fifth of each day is left open
    await store.aclose()
    with sqlite3.connect(db) as raw:
        periods = raw.execute("SELECT COUNT(*) FROM apportion_periods").fetchone()[0]
        reservations = raw.execute("SELECT COUNT(*) FROM apportion_reservations").fetchone()[0]
    assert periods <= 4 and reservations <= 4  # not one row per request, nor per day forever


# -- concurrency -------------------------------------------------------------------------------------------


async def test_200_concurrent_reservations_are_granted_exactly_the_quota(db):
    await check_concurrent_holds(lambda options: opened(db, **options_dict(options)))


async def test_200_concurrent_requests_reserve_and_settle_exactly_the_quota(db):
    await check_concurrent_reserve_settle(lambda options: opened(db, **options_dict(options)))


def options_dict(options: QuotaStoreOptions) -> dict[str, object]:
    return {"owner": options.owner}


# -- opening a store, and the words ---------------------------------------------------------------------


def test_the_default_file_follows_xdg_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "apportion" / "keys.db"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_db_path() == tmp_path / "home" / ".local" / "share" / "apportion" / "keys.db"

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))

    async def go() -> None:
        store = await open_key_store()
        await store.create_key(KeySpec("default"))
        await store.aclose()

    asyncio.run(go())
    path = tmp_path / "xdg" / "apportion" / "keys.db"
    assert path.is_file() and path.stat().st_mode & 0o077 == 0  # its owner's only


async def test_a_file_that_is_not_a_key_store_is_a_clear_error(tmp_path):
    bad = tmp_path / "not.db"
    bad.write_text("this is not a database\n" * 100)
    with pytest.raises(KeyStoreError, match=re.escape(str(bad))):
        await open_key_store(bad)
    store = await open_key_store(tmp_path / "closed.db")
    await store.aclose()
    with pytest.raises(KeyStoreError, match="closed"):
        await store.list_keys()


def test_periods_dollars_and_their_words():
    periods = ("1d", "12h", "30m", "1w", "90s", "3600")
    assert [parse_period(p) for p in periods] == [86400, 43200, 1800, 604800, 90, 3600]
    for bad in ("0d", "1y", "-1h", "", "1.5h"):
        with pytest.raises(ConfigError, match="period"):
            parse_period(bad)
    assert [period_word(s) for s in (86400, 3600, 43200, 172800, 90)] == ["day", "hour", "12h", "2d", "90s"]
    assert parse_usd("0.10") == Fraction(1, 10) and parse_usd("$1/3") == Fraction(1, 3)
    for bad in ("0", "-1", "abc", "nan", "1/0"):
        with pytest.raises(ConfigError, match="dollars"):
            parse_usd(bad)
    assert [format_usd(Fraction(x)) for x in ("0", "5", "1/10", "3/20000000", "-1/4")] == \
        ["0", "5", "0.1", "0.00000015", "-0.25"]
    assert format_usd(Fraction(1, 3)) == "≈0.333333333"


# -- the command line -------------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["keys", *args])
    return result.exit_code, result.stdout, result.stderr


def test_keys_create_list_usage_top_up_revoke_on_the_command_line(db):
    code, out, err = cli("create", "alice", "--tokens-per-day", "1000", "--usd-per-day", "0.5",
                         "--requests-per-day", "20", "--max-request", "gen=16,tokens=8000", "--db", str(db))
    assert code == 0, err
    secret = out.strip()
    assert secret.startswith("ap-") and "\n" not in secret and "shown only now" in err

    code, out, _ = cli("list", "--db", str(db))
    assert code == 0 and "alice" in out and "1000 tokens, $0.5, 20 requests per day" in out and secret not in out
    assert "max request generations=16,total_tokens=8000" in out
    listed = json.loads(cli("list", "--db", str(db), "--json")[1])
    assert listed[0]["usd_per_period"] == "1/2" and "secret" not in listed[0]

    async def spend() -> None:
        store = await open_key_store(db)
        key = await store.authenticate(secret)
        await store.reserve(key, "open", Charge(300, Fraction(1, 10), 1))
        await store.reserve(key, "done", Charge(100, Fraction(0), 1))
        await store.settle("done", Charge(60, Fraction(1, 20)))
        await store.aclose()

    asyncio.run(spend())
    code, out, _ = cli("usage", "alice", "--db", str(db))
    assert code == 0
    assert "tokens    60 spent, 300 held; 640 left of 1000" in out
    assert "dollars   $0.05 spent, $0.1 held; $0.35 left of $0.5" in out
    assert "requests  2; 18 left of 20" in out and "open reservations  1" in out and "resets at " in out

    code, out, _ = cli("top-up", "alice", "--tokens", "500", "--usd", "0.25", "--db", str(db), "--json")
    topped = json.loads(out)
    assert code == 0 and topped["left"] == {"tokens": 1140, "usd": "3/5", "requests": 18}
    assert topped["open_reservations"] == 1 and topped["top_up"]["tokens"] == 500

    key_id = listed[0]["id"]
    code, out, _ = cli("revoke", key_id, "--db", str(db))
    assert code == 0 and f"key alice ({key_id}) revoked" in out

    async def refused() -> None:
        store = await open_key_store(db)
        with pytest.raises(InvalidKey, match="revoked"):
            await store.authenticate(secret)
        await store.aclose()

    asyncio.run(refused())
    assert "REVOKED" in cli("usage", "alice", "--db", str(db))[1]


@pytest.mark.parametrize(("args", "message"), [
    (("usage", "nobody"), "no key named 'nobody'"),
    (("revoke", "nobody"), "no key named 'nobody'"),
    (("create", "bad name"), "key name 'bad name'"),
    (("create", "x", "--max-request", "gen=lots"), "--max-request: budget generations must be a number"),
    (("create", "x", "--usd-per-day", "-1"), "dollars must be > 0"),
    (("create", "x", "--tokens-per-day", "0"), "tokens per period must be a whole number > 0"),
    (("create", "x", "--period", "1y"), "a period is a whole number"),
    (("top-up", "nobody", "--tokens", "5"), "no key named 'nobody'"),
    (("top-up", "x", "--tokens", "-5"), "must be >= 0"),
])
def test_bad_command_lines_exit_2_naming_the_problem(db, args, message):
    code, out, err = cli(*args, "--db", str(db))
    assert code == 2 and message in err and "Traceback" not in out + err


def test_a_database_that_cannot_be_opened_exits_1(tmp_path):
    bad = tmp_path / "not.db"
    bad.write_text("this is not a database\n" * 100)
    code, _, err = cli("list", "--db", str(bad))
    assert code == 1 and "key store" in err and str(bad) in err.replace("\n", "")
