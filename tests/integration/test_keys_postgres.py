"""The key store in a real PostgreSQL, started here from Debian's package (as the ``postgres`` user
where the tests run as root: PostgreSQL refuses root) on a free port of 127.0.0.1 and stopped after:
the same concurrency and restart checks as SQLite's, on two stores sharing the database as two
server replicas would, and ``apportion keys --db postgresql://...``. Skipped, saying why, where
PostgreSQL or psycopg is not installed."""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apportion.cli import app
from apportion.serve.keys import KeySpec, KeyStore, KeyStoreError, QuotaStoreOptions, open_key_store
from apportion.serve.quota_contract import Charge, InvalidKey
from tests.conftest import free_port
from tests.support.quota_checks import check_concurrent_holds, check_concurrent_reserve_settle, check_restart_recovers


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's programs (Debian keeps them out of PATH)."""
    found = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
             if (p / "initdb").is_file() and (p / "pg_ctl").is_file()]
    return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, default=None)


@dataclass(frozen=True)
class Postgres:
    url: str
    restart: Callable[[], None]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL server for this module's tests: its URL, and a way to restart it."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install -e '.[dev]'")
    programs = _postgres_bin()
    if programs is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): apt-get install postgresql")
    as_root = os.geteuid() == 0
    if as_root:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and there is no postgres user to run PostgreSQL as (it refuses root)")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to run PostgreSQL as the postgres user")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    home = Path(tempfile.mkdtemp(prefix="apportion-pg-"))  # under /tmp: pytest's tmp_path is root's only
    if as_root:
        shutil.chown(home, "postgres", "postgres")
    data, log, port = home / "data", home / "server.log", free_port()
    subprocess.run([*prefix, str(programs / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"

    def pg_ctl(action: str) -> None:
        done = subprocess.run([*prefix, str(programs / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options,
                               "-m", "fast", "-w", "-t", "60", action], capture_output=True, timeout=90, text=True)
        assert done.returncode == 0, f"pg_ctl {action} failed: {done.stderr}\n{log.read_text(errors='replace')}"

    try:
        pg_ctl("start")
        yield Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", lambda: pg_ctl("restart"))
    finally:
        subprocess.run([*prefix, str(programs / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def database(postgres: Postgres) -> str:
    """A database of its own for each test, on the module's server."""
    import psycopg

    name = f"keys_{secrets.token_hex(6)}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # a name made here, not input
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def opener(url: str):  # type: ignore[no-untyped-def]
    async def open_store(options: QuotaStoreOptions) -> KeyStore:
        return await open_key_store(url, options)

    return open_store


async def test_200_concurrent_reservations_on_two_replicas_are_granted_exactly_the_quota(database):
    await check_concurrent_holds(opener(database))


async def test_200_concurrent_requests_on_two_replicas_reserve_and_settle_exactly_the_quota(database):
    await check_concurrent_reserve_settle(opener(database))


async def test_a_restarted_server_charges_the_reservations_it_left_open(database):
    await check_restart_recovers(opener(database))


async def test_a_revoke_by_one_replica_stops_the_key_on_the_other_at_once(database):
    a, b = await open_key_store(database), await open_key_store(database)
    _, secret = await a.create_key(KeySpec("shared", tokens=100))
    key = await b.authenticate(secret)
    await b.reserve(key, "r", Charge(10, Fraction(0), 1))
    await a.revoke("shared")
    with pytest.raises(InvalidKey, match="revoked"):
        await b.authenticate(secret)
    with pytest.raises(InvalidKey, match="revoked"):
        await b.reserve(key, "r2", Charge(10, Fraction(0), 1))
    await b.settle("r", Charge(4))
    assert (await a.usage("shared")).spent.tokens == 4
    assert "postgres@" not in a.describe() and a.describe().startswith("postgresql://127.0.0.1:")
    await a.aclose()
    await b.aclose()


def test_the_keys_command_line_on_postgresql(database):
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "pg", "--tokens-per-day", "500", "--db", database])
    assert created.exit_code == 0, created.stderr
    secret = created.stdout.strip()

    async def spend() -> None:
        store = await open_key_store(database)
        await store.reserve(await store.authenticate(secret), "open", Charge(120, Fraction(0), 1))
        await store.aclose()

    asyncio.run(spend())
    usage = runner.invoke(app, ["keys", "usage", "pg", "--db", database])
    assert usage.exit_code == 0 and "0 spent, 120 held; 380 left of 500" in usage.stdout
    assert "open reservations  1" in usage.stdout
    unreachable = runner.invoke(app, ["keys", "list", "--db", f"postgresql://postgres@127.0.0.1:{free_port()}/x"])
    assert unreachable.exit_code == 1 and "key store postgresql://127.0.0.1:" in unreachable.stderr


async def test_a_restarted_database_costs_one_failed_call_per_connection_and_keeps_the_quotas(postgres, database):
    store = await open_key_store(database, QuotaStoreOptions(connections=1))
    _, secret = await store.create_key(KeySpec("durable", tokens=100))
    key = await store.authenticate(secret)
    await store.reserve(key, "before", Charge(30, Fraction(0), 1))
    postgres.restart()
    with pytest.raises(KeyStoreError, match=r"key store postgresql://127\.0\.0\.1:"):
        await store.authenticate(secret)  # its connection died with the server
    assert (await store.authenticate(secret)).key_id == key.key_id  # reconnected
    await store.settle("before", Charge(25))
    assert (await store.usage("durable")).tokens_left == 75
    await store.aclose()
