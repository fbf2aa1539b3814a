"""``apportion keys``: the API keys of ``apportion serve`` and their quotas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from apportion.cli._app import EXIT_FAILURE, EXIT_USAGE, app, fail
from apportion.errors import ApportionError
from apportion.serve.keys import (
    KeyRecord,
    KeySpec,
    KeyStore,
    KeyStoreError,
    KeyUsage,
    format_usd,
    iso,
    open_key_store,
    parse_max_request,
    parse_period,
    parse_usd,
    period_word,
)
from apportion.serve.quota_contract import Charge

keys_app = typer.Typer(
    name="keys",
    help="API keys of `apportion serve` and their quotas (tokens, dollars and requests per period).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

T = TypeVar("T")

DbOpt = Annotated[str | None, typer.Option(
    "--db", help="The key store: an SQLite file or postgresql://user@host/db "
                 "(default: $XDG_DATA_HOME/apportion/keys.db, else ~/.local/share/apportion/keys.db).")]
KeyArg = Annotated[str, typer.Argument(help="The key's name or id.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _with_store(db: str | None, work: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run ``work`` on the store at ``db``; errors end the command with the CLI's exit codes."""
    console = Console(stderr=True, soft_wrap=True)

    async def go() -> T:
        store = await open_key_store(db)
        try:
            return await work(store)
        finally:
            await store.aclose()

    try:
        return asyncio.run(go())
    except KeyStoreError as exc:
        fail(console, exc, EXIT_FAILURE)
    except ApportionError as exc:  # ConfigError, KeyNotFound: what the command line said
        fail(console, exc, EXIT_USAGE)


def _checked(console: Console, build: Callable[[], T]) -> T:
    try:
        return build()
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A name for the key (letters, digits, . _ @ -).", show_default=False)],
    tokens: Annotated[int | None, typer.Option(
        "--tokens-per-day", "--tokens-per-period",
        help="Tokens (input + output) per period. Default: unlimited.")] = None,
    usd: Annotated[str | None, typer.Option(
        "--usd-per-day", "--usd-per-period",
        help="Dollars per period, exact (e.g. 5 or 0.25). Default: unlimited.")] = None,
    requests: Annotated[int | None, typer.Option(
        "--requests-per-day", "--requests-per-period", help="Requests per period. Default: unlimited.")] = None,
    max_request: Annotated[str | None, typer.Option(
        "--max-request", help="The largest budget one request may ask for, e.g. 'gen=16,tokens=8000'.")] = None,
    period: Annotated[str, typer.Option(
        "--period", help="The quotas' period: 1d (from 00:00 UTC), 12h, 1h, 1w...")] = "1d",
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print its secret, once: only its hash is stored."""
    console = Console(stderr=True, soft_wrap=True)
    spec = _checked(console, lambda: KeySpec(
        name, tokens=tokens, usd=parse_usd(usd) if usd is not None else None, requests=requests,
        max_request=parse_max_request(max_request) if max_request is not None else None,
        period_s=parse_period(period)))
    record, secret = _with_store(db, lambda store: store.create_key(spec))
    if as_json:
        typer.echo(json.dumps({**_record_json(record), "secret": secret}))
        return
    console.print(f"created key {record.name} ({record.key_id}): {_quotas(record)}. "
                  "Its secret, shown only now:", highlight=False)
    typer.echo(secret)


@keys_app.command("list")
def list_keys(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the keys and their quotas (never a secret)."""
    records = _with_store(db, lambda store: store.list_keys())
    if as_json:
        typer.echo(json.dumps([_record_json(r) for r in records]))
        return
    if not records:
        Console(stderr=True).print("no keys yet: `apportion keys create NAME`")
        return
    for r in records:
        state = f"revoked {iso(r.revoked_at)}" if r.revoked_at else "active"
        limit = f"; max request {r.max_request}" if r.max_request else ""
        typer.echo(f"{r.key_id}  {r.name}  {state}  created {iso(r.created_at)}  {_quotas(r)}{limit}")


@keys_app.command("revoke")
def revoke(key: KeyArg, db: DbOpt = None) -> None:
    """Revoke a key: its next request is refused (requests in flight still settle)."""
    record, changed = _with_store(db, lambda store: store.revoke(key))
    when = iso(record.revoked_at) if record.revoked_at else ""
    message = "revoked" if changed else "was already revoked at"
    typer.echo(f"key {record.name} ({record.key_id}) {message} {when}".rstrip())


@keys_app.command("usage")
def usage(key: KeyArg, db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """The key's current period: tokens, dollars and requests spent and left, open reservations, reset time."""
    found = _with_store(db, lambda store: store.usage(key))
    typer.echo(json.dumps(_usage_json(found)) if as_json else _usage_text(found))


@keys_app.command("top-up")
def top_up(
    key: KeyArg,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to add to this period's allowance.")] = 0,
    usd: Annotated[str | None, typer.Option("--usd", help="Dollars to add to this period's allowance, exact.")] = None,
    requests: Annotated[int, typer.Option("--requests", help="Requests to add to this period's allowance.")] = 0,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add to the key's allowance for the current period only (the next starts from its quotas)."""
    console = Console(stderr=True, soft_wrap=True)
    if tokens < 0 or requests < 0:
        fail(console, ApportionError("--tokens and --requests must be >= 0"), EXIT_USAGE)
    extra = Charge(tokens=tokens, usd=_checked(console, lambda: parse_usd(usd)) if usd is not None else Fraction(0),
                   requests=requests)
    found = _with_store(db, lambda store: store.top_up(key, extra))
    typer.echo(json.dumps(_usage_json(found)) if as_json else _usage_text(found))


# -- what is printed --------------------------------------------------------------------------------


def _quotas(r: KeyRecord) -> str:
    parts = [f"{r.tokens} tokens" if r.tokens is not None else None,
             f"${format_usd(r.usd)}" if r.usd is not None else None,
             f"{r.requests} requests" if r.requests is not None else None]
    shown = ", ".join(p for p in parts if p)
    return f"{shown} per {period_word(r.period_s)}" if shown else "no quotas"


def _usage_text(u: KeyUsage) -> str:
    k = u.key
    lines = [f"key {k.name} ({k.key_id}){' REVOKED' if k.revoked_at else ''}: period from {iso(u.period_start)}, "
             f"resets at {iso(u.resets_at)}"]
    tokens_left, usd_left, requests_left = u.tokens_left, u.usd_left, u.requests_left
    lines.append(f"  tokens    {u.spent.tokens} spent, {u.held.tokens} held"
                 + (f"; {max(tokens_left, 0)} left of {(k.tokens or 0) + u.top_up.tokens}"
                    if tokens_left is not None else "; unlimited"))
    lines.append(f"  dollars   ${format_usd(u.spent.usd)} spent, ${format_usd(u.held.usd)} held"
                 + (f"; ${format_usd(max(usd_left, Fraction(0)))} left of ${format_usd((k.usd or 0) + u.top_up.usd)}"
                    if usd_left is not None else "; unlimited"))
    lines.append(f"  requests  {u.spent.requests}"
                 + (f"; {max(requests_left, 0)} left of {(k.requests or 0) + u.top_up.requests}"
                    if requests_left is not None else "; unlimited"))
    lines.append(f"  open reservations  {u.open_reservations}")
    if u.top_up.tokens or u.top_up.usd or u.top_up.requests:
        lines.append(f"  topped up this period: {u.top_up.tokens} tokens, ${format_usd(u.top_up.usd)}, "
                     f"{u.top_up.requests} requests")
    return "\n".join(lines)


def _usd_json(value: Fraction | None) -> str | None:
    """Exact: the fraction's text ("3/20000000"), which ``Fraction(text)`` reads back."""
    return None if value is None else str(value)


def _record_json(r: KeyRecord) -> dict[str, Any]:
    return {"id": r.key_id, "name": r.name, "created_at": iso(r.created_at),
            "revoked_at": iso(r.revoked_at) if r.revoked_at else None, "period_s": r.period_s,
            "tokens_per_period": r.tokens, "usd_per_period": _usd_json(r.usd), "requests_per_period": r.requests,
            "max_request": r.max_request.limits() if r.max_request else None}


def _charge_json(c: Charge) -> dict[str, Any]:
    return {"tokens": c.tokens, "usd": _usd_json(c.usd), "requests": c.requests}


def _usage_json(u: KeyUsage) -> dict[str, Any]:
    return {"key": _record_json(u.key), "period_start": iso(u.period_start), "resets_at": iso(u.resets_at),
            "spent": _charge_json(u.spent), "held": _charge_json(u.held), "top_up": _charge_json(u.top_up),
            "open_reservations": u.open_reservations,
            "left": {"tokens": u.tokens_left, "usd": _usd_json(u.usd_left), "requests": u.requests_left}}

