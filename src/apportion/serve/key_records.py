"""What a key store keeps and says: a key to create (``KeySpec``), a stored key (``KeyRecord``), its
current period (``KeyUsage``), how a store runs (``QuotaStoreOptions``), the errors, what a period
has left to grant, and the words of periods, dollars and times in messages."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction

from apportion.budget.units import Budget
from apportion.errors import ApportionError, BudgetError, ConfigError
from apportion.serve.quota_contract import Charge, KeyInfo, QuotaExceeded, QuotaStoreFailed

DAY_S = 86_400
_KEY_ID_PREFIX = "key_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_PERIOD = re.compile(r"(\d+)\s*([smhdw]?)")
_PERIOD_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": DAY_S, "w": 7 * DAY_S}
_PERIOD_WORDS = {60: "minute", 3600: "hour", DAY_S: "day", 7 * DAY_S: "week"}


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


# -- what a period has left to grant --------------------------------------------------------------


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


# -- the words of messages ------------------------------------------------------------------------


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
