"""The ledger: every call is reserved at its worst case before it is made and settled after.

Reservation is what makes "never exceed the budget" hold for every algorithm: a call is only made
once the ledger has set aside the most it could consume (n samples x max_tokens, plus the prompt,
plus its price), clamping ``n`` and then ``max_tokens`` so that the worst case fits. Settling
replaces the worst case by the real usage and frees the rest. Ledgers nest: a child reserves in its
parent too, so a batch budget can hand sub-budgets to prompts and spend rolls up.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from apportion.budget.units import Budget, Overrun, Price, Spend, Usage, to_fraction
from apportion.errors import BudgetError

_grant_ids = itertools.count(1)

CALL_KINDS = ("policy", "scorer", "continuation", "planning", "tool")
"""What a call is for. "policy" samples answer the question and count as generations. The others
are charged tokens, dollars and time and counted apart: "scorer" (judges), "continuation" (more of
a solution already counted, as budget forcing makes), "planning" (a call that decides how to
answer, such as TALE's token-budget estimate). "tool" is a run of a tool, not of the model (a
sandboxed program): its ``n`` is tool calls, limited by ``Budget.tool_calls`` and the deadline; it
asks for no tokens (``Ask.tool``)."""


@dataclass(frozen=True, slots=True)
class Ask:
    """What a caller would like to spend on one backend call."""

    n: int
    max_tokens: int
    prompt_tokens: int
    """Upper bound of the prompt's tokens for the request (exact where the backend can count). One
    request pays for its prompt once, whatever its ``n``; samples drawn by separate requests are
    separate asks."""
    price: Price = field(default_factory=Price)
    kind: str = "policy"
    """One of CALL_KINDS: only "policy" samples are limited by (and count as) generations."""
    min_tokens: int = 1
    """Below this many output tokens a sample is not worth starting: refuse instead."""

    def __post_init__(self) -> None:
        if self.kind not in CALL_KINDS:
            raise BudgetError(f"call kind must be one of {CALL_KINDS}, got {self.kind!r}")
        # A tool run is reserved through the same protocol, but pays in tool calls, never in tokens.
        # An input-only call (a reward model's forward pass) pays for its input and generates nothing.
        if self.kind == "tool":
            tokens_ok = self.max_tokens == 0 and self.prompt_tokens == 0 and self.min_tokens >= 1
        elif self.max_tokens == 0:
            tokens_ok = self.kind != "policy" and self.min_tokens == 0 and self.prompt_tokens >= 0
        else:
            tokens_ok = self.max_tokens >= 1 and self.min_tokens >= 1 and self.prompt_tokens >= 0
        if self.n < 1 or not tokens_ok:
            raise BudgetError(f"invalid ask: {self}")

    @classmethod
    def tool(cls, n: int = 1) -> Ask:
        """``n`` tool runs (no tokens: the worst case of a run is the run itself)."""
        return cls(n=n, max_tokens=0, prompt_tokens=0, kind="tool")

    @classmethod
    def input_only(cls, prompt_tokens: int, *, n: int = 1, price: Price | None = None,
                   kind: str = "scorer") -> Ask:
        """A call that reads ``prompt_tokens`` tokens (at most) and generates none, such as a
        reward model's forward pass over ``n`` texts; never "policy" (it answers nothing)."""
        return cls(n=n, max_tokens=0, prompt_tokens=prompt_tokens, price=price or Price(), kind=kind, min_tokens=0)


@dataclass(frozen=True, slots=True)
class Grant:
    """What the ledger allows for one call; ``worst`` is the usage set aside for it."""

    id: int
    n: int
    max_tokens: int
    worst: Usage
    worst_usd: Fraction
    price: Price
    kind: str
    clamped: bool


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One settled call, for the trace of a Result."""

    kind: str
    model: str
    n_asked: int
    n_granted: int
    max_tokens_asked: int
    max_tokens_granted: int
    usage: Usage
    usd: float
    latency_s: float
    notes: tuple[str, ...] = ()
    error: str | None = None
    overrun: Overrun = field(default_factory=Overrun)
    """What the server forced past this call's reservation (charged, and shown apart)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.model,
            "n_asked": self.n_asked,
            "n_granted": self.n_granted,
            "max_tokens_asked": self.max_tokens_asked,
            "max_tokens_granted": self.max_tokens_granted,
            "generations": self.usage.generations,
            "tool_calls": self.usage.tool_calls,
            "input_tokens": self.usage.input_tokens,
            "cached_input_tokens": self.usage.cached_input_tokens,
            "output_tokens": self.usage.output_tokens,
            "usage_estimated": self.usage.estimated,
            "usd": self.usd,
            "latency_s": round(self.latency_s, 4),
            "notes": list(self.notes),
            "error": self.error,
            "server_overrun": self.overrun.to_dict() if self.overrun.calls else None,
        }


@dataclass(slots=True)
class _Tally:
    generations: int = 0
    scorer_generations: int = 0
    continuations: int = 0
    planning_generations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Fraction = Fraction(0)
    tool_calls: int = 0
    cached_input_tokens: int = 0

    def add(self, usage: Usage, usd: Fraction, kind: str, sign: int = 1) -> None:
        self.tool_calls += sign * usage.tool_calls
        if kind == "tool":  # its usage has no generations or tokens to count
            return
        if kind == "scorer":
            self.scorer_generations += sign * usage.generations
        elif kind == "continuation":
            self.continuations += sign * usage.generations
        elif kind == "planning":
            self.planning_generations += sign * usage.generations
        else:
            self.generations += sign * usage.generations
        self.input_tokens += sign * usage.input_tokens
        self.cached_input_tokens += sign * usage.cached_input_tokens
        self.output_tokens += sign * usage.output_tokens
        if usd:  # free models cost nothing: no Fraction arithmetic for them
            self.usd += sign * usd

    def add_spend(self, spend: Spend) -> None:
        """What calls made elsewhere spent, kinds kept apart as they were there."""
        self.generations += spend.generations
        self.scorer_generations += spend.scorer_generations
        self.continuations += spend.continuations
        self.planning_generations += spend.planning_generations
        self.input_tokens += spend.input_tokens
        self.cached_input_tokens += spend.cached_input_tokens
        self.output_tokens += spend.output_tokens
        self.usd += spend.usd
        self.tool_calls += spend.tool_calls


@dataclass(frozen=True, slots=True)
class Remaining:
    """What is left in each limited unit (None: unlimited), net of outstanding reservations."""

    generations: int | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int | None
    usd: Fraction | None
    seconds: float | None
    tool_calls: int | None = None


HELD_UNITS = ("generations", "input_tokens", "output_tokens", "total_tokens", "usd", "tool_calls")


@dataclass(slots=True)
class _Held:
    """Amounts set aside outside any one call, unit by unit: holds for work done elsewhere, and
    what a stand-in ledger's original had already used (``Ledger.standing_in``). Unlike a call's
    reservation, a hold may limit total tokens apart from input and output."""

    generations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    usd: Fraction = Fraction(0)
    tool_calls: int = 0

    def add(self, amounts: Remaining, sign: int = 1) -> None:
        for unit in HELD_UNITS:
            value = getattr(amounts, unit)
            if value is not None:
                setattr(self, unit, getattr(self, unit) + sign * value)


class Ledger:
    """Concurrency-safe account of one budget. Create one per run (or ``child`` for a sub-budget)."""

    def __init__(
        self,
        budget: Budget,
        *,
        parent: Ledger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.parent = parent
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._spent = _Tally()
        self._reserved = _Tally()
        self._overrun = Overrun()
        self._open: dict[int, Grant] = {}
        self._held = _Held()
        self._holds: dict[int, Remaining] = {}
        self._calls = 0
        self._estimated = False
        self._last_settle = self._start
        self.trace: list[CallRecord] = []
        self.exhausted_reason: str | None = None
        self._usd_limit = to_fraction(budget.usd) if budget.usd is not None else None

    # -- queries -------------------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return self.exhausted_reason is not None

    def elapsed(self) -> float:
        return self._clock() - self._start

    def deadline(self) -> float | None:
        """Absolute clock time by which all work must end (the tightest along the parent chain)."""
        own = self._start + self.budget.seconds if self.budget.seconds is not None else None
        up = self.parent.deadline() if self.parent is not None else None
        if own is None:
            return up
        return own if up is None else min(own, up)

    def seconds_left(self) -> float | None:
        deadline = self.deadline()
        return None if deadline is None else deadline - self._clock()

    def remaining(self) -> Remaining:
        with self._lock:
            return self._remaining_locked()

    def _remaining_locked(self) -> Remaining:
        b, s, r, h = self.budget, self._spent, self._reserved, self._held

        def left(limit: int | None, used: int) -> int | None:
            return None if limit is None else limit - used

        return Remaining(
            generations=left(b.generations, s.generations + r.generations + h.generations),
            input_tokens=left(b.input_tokens, s.input_tokens + r.input_tokens + h.input_tokens),
            output_tokens=left(b.output_tokens, s.output_tokens + r.output_tokens + h.output_tokens),
            total_tokens=left(
                b.total_tokens,
                s.input_tokens + s.output_tokens + r.input_tokens + r.output_tokens + h.total_tokens,
            ),
            usd=None if self._usd_limit is None else self._usd_limit - s.usd - r.usd - h.usd,
            seconds=self.seconds_left(),
            tool_calls=left(b.tool_calls, s.tool_calls + r.tool_calls + h.tool_calls),
        )

    def spend(self) -> Spend:
        with self._lock:
            s = self._spent
            return Spend(
                generations=s.generations,
                scorer_generations=s.scorer_generations,
                continuations=s.continuations,
                planning_generations=s.planning_generations,
                tool_calls=s.tool_calls,
                input_tokens=s.input_tokens,
                output_tokens=s.output_tokens,
                usd=s.usd,
                seconds=self.elapsed(),
                calls=self._calls,
                estimated=self._estimated,
                overrun=self._overrun,
                cached_input_tokens=s.cached_input_tokens,
            )

    # -- reserve / settle ----------------------------------------------------------------------

    def reserve(self, ask: Ask) -> Grant | None:
        """Set aside the worst case of a call, clamped to what remains; None (and a recorded
        reason) when not even one sample of ``ask.min_tokens`` tokens fits."""
        with self._lock:
            fit = self._fit(ask, self._remaining_locked())
            if isinstance(fit, str):
                self.exhausted_reason = fit
                return None
            n, max_tokens = fit
            if self.parent is not None:
                upstream = self.parent.reserve(
                    Ask(n, max_tokens, ask.prompt_tokens, ask.price, ask.kind, ask.min_tokens)
                )
                if upstream is None:
                    self.exhausted_reason = f"parent budget: {self.parent.exhausted_reason}"
                    return None
                n, max_tokens, gid = upstream.n, upstream.max_tokens, upstream.id
            else:
                gid = next(_grant_ids)
            worst = Usage(tool_calls=n) if ask.kind == "tool" else worst_usage(n, max_tokens, ask.prompt_tokens)
            worst_usd = ask.price.cost(worst.input_tokens, worst.output_tokens)
            grant = Grant(gid, n, max_tokens, worst, worst_usd, ask.price, ask.kind,
                          clamped=(n, max_tokens) != (ask.n, ask.max_tokens))
            self._reserved.add(worst, worst_usd, ask.kind)
            self._open[gid] = grant
            return grant

    def settle(self, grant: Grant, usage: Usage, record: CallRecord | None = None) -> Fraction:
        """Replace a grant's worst case by what the call really consumed; returns its cost (the
        usage's cached input tokens at the price's cached rate; the worst case set aside charged
        every input token the full input price, so the cost never exceeds it).

        Tokens above the worst case (a server that ignored max_tokens or sent choices nobody asked
        for) are charged as reported, never hidden, and counted as the server's overrun. More
        generations than granted is the caller's bug, refused.
        """
        if usage.generations > grant.n:
            raise BudgetError(f"grant {grant.id} allowed {grant.n} generations, settled with {usage.generations}")
        if usage.tool_calls > grant.worst.tool_calls:
            raise BudgetError(f"grant {grant.id} allowed {grant.worst.tool_calls} tool calls, "
                              f"settled with {usage.tool_calls}")
        usd = grant.price.charge(usage)
        over = overrun(grant, usage)
        with self._lock:
            if self._open.pop(grant.id, None) is None:
                raise BudgetError(f"grant {grant.id} settled twice or never reserved here")
            self._reserved.add(grant.worst, grant.worst_usd, grant.kind, sign=-1)
            self._spent.add(usage, usd, grant.kind)
            if over.calls:
                self._overrun = self._overrun + over
            self._calls += 1
            self._estimated = self._estimated or usage.estimated
            if record is not None:
                self.trace.append(record)
        if self.parent is not None:
            self.parent.settle(grant, usage, record)
        return usd

    def release(self, grant: Grant) -> None:
        """Give back a grant whose call consumed nothing (it was never sent, or failed at once)."""
        with self._lock:
            if self._open.pop(grant.id, None) is None:
                raise BudgetError(f"grant {grant.id} released twice or never reserved here")
            self._reserved.add(grant.worst, grant.worst_usd, grant.kind, sign=-1)
        if self.parent is not None:
            self.parent.release(grant)

    # -- holds: work done elsewhere (a batch's remote workers) ------------------------------------

    def hold(self, amounts: Remaining) -> int | None:
        """Set aside ``amounts`` (None: nothing in that unit; seconds are not held) here and in
        every ledger above, for work that runs elsewhere on a ledger of its own no larger and
        reports what it spent (``settle_hold``). None, holding nothing, unless all of it fits
        (nothing always fits, even where a server's overrun left less than nothing)."""
        with self._lock:
            rem = self._remaining_locked()
            for unit in HELD_UNITS:
                want, left = getattr(amounts, unit), getattr(rem, unit)
                if want is not None and (want < 0 or (want > 0 and left is not None and want > left)):
                    return None
            if self.parent is not None:
                held = self.parent.hold(amounts)
                if held is None:
                    return None
            else:
                held = next(_grant_ids)
            self._held.add(amounts)
            self._holds[held] = amounts
            return held

    def settle_hold(self, held: int, spend: Spend, records: Sequence[CallRecord] = ()) -> None:
        """Replace a hold by what the work done under it spent (its ledger's ``spend()``, kinds,
        calls, estimates and the server's overrun included) and add its calls to the trace.
        Tokens past the hold are charged as the calls' own settling charged them; more
        generations or tool calls than held is the caller's bug, refused."""
        with self._lock:
            amounts = self._holds.get(held)
            if amounts is None:
                raise BudgetError(f"hold {held} settled twice or never made here")
            for unit in ("generations", "tool_calls"):
                cap = getattr(amounts, unit)
                if cap is not None and getattr(spend, unit) > cap:
                    raise BudgetError(f"hold {held} allowed {cap} {unit}, settled with {getattr(spend, unit)}")
            del self._holds[held]
            self._held.add(amounts, sign=-1)
            self._spent.add_spend(spend)
            self._overrun = self._overrun + spend.overrun
            self._calls += spend.calls
            self._estimated = self._estimated or spend.estimated
            self.trace.extend(records)
        if self.parent is not None:
            self.parent.settle_hold(held, spend, records)

    def release_hold(self, held: int) -> None:
        """Give back a hold under which nothing was spent."""
        self.settle_hold(held, Spend())

    @classmethod
    def standing_in(cls, budget: Budget, left: Remaining, *, parent: Ledger | None = None) -> Ledger:
        """A ledger with ``budget``'s limits of which only ``left`` remains (None: all of it), so
        that a run elsewhere is clamped, refused and told why exactly as on the ledger it stands
        in for. ``budget.seconds`` counts from now. A unit ``left`` gives must be one ``budget``
        limits, with no more left than the limit."""
        ledger = cls(budget, parent=parent)
        full = ledger.remaining()
        taken: dict[str, Any] = {}
        for unit in HELD_UNITS:
            have, limit = getattr(left, unit), getattr(full, unit)
            if have is not None and (limit is None or have > limit):
                raise BudgetError(f"{unit}: {have} left is more than the limit {limit}")
            taken[unit] = None if have is None or limit is None else limit - have
        ledger._held.add(Remaining(**taken, seconds=None))
        return ledger

    def child(self, budget: Budget) -> Ledger:
        """A sub-ledger: its calls must fit both its own budget and this one's."""
        return Ledger(budget, parent=self, clock=self._clock)

    def top_up(self, budget: Budget) -> None:
        """Replace this ledger's limits by ``budget`` (a batch allocator giving a prompt more, or
        setting its share for the next round). A limit below what is already spent or reserved
        in its unit is refused: spend cannot be undone. The deadline keeps its start."""
        with self._lock:
            h = self._held
            used = Remaining(
                generations=self._spent.generations + self._reserved.generations + h.generations,
                input_tokens=self._spent.input_tokens + self._reserved.input_tokens + h.input_tokens,
                output_tokens=self._spent.output_tokens + self._reserved.output_tokens + h.output_tokens,
                total_tokens=(self._spent.input_tokens + self._spent.output_tokens
                              + self._reserved.input_tokens + self._reserved.output_tokens + h.total_tokens),
                usd=self._spent.usd + self._reserved.usd + h.usd,
                seconds=None,
                tool_calls=self._spent.tool_calls + self._reserved.tool_calls + h.tool_calls,
            )
            for unit in ("generations", "input_tokens", "output_tokens", "total_tokens", "usd", "tool_calls"):
                limit = getattr(budget, unit)
                if limit is not None and to_fraction(limit) < getattr(used, unit):
                    raise BudgetError(f"cannot set {unit} to {limit}: {getattr(used, unit)} already spent or reserved")
            self.budget = budget
            self._usd_limit = to_fraction(budget.usd) if budget.usd is not None else None
            self.exhausted_reason = None

    # -- clamping ------------------------------------------------------------------------------

    def _fit(self, ask: Ask, rem: Remaining) -> tuple[int, int] | str:
        """Largest n that fits at the full max_tokens; failing that, one sample with as many
        tokens as fit. Truncating one sample beats truncating all of them."""
        if rem.seconds is not None and rem.seconds <= 0:
            return "seconds: deadline reached"
        if ask.kind == "tool":
            if rem.tool_calls is None:
                return ask.n, 0
            if rem.tool_calls < 1:
                return "tool_calls: none left"
            return min(ask.n, rem.tool_calls), 0
        n_cap = ask.n
        if ask.kind == "policy" and rem.generations is not None:
            if rem.generations < 1:
                return "generations: none left"
            n_cap = min(n_cap, rem.generations)
        if ask.max_tokens == 0:  # input only: the whole input fits, or the call is refused
            return (ask.n, 0) if _input_fits(ask, rem) else _binding_unit(ask, rem)
        for n in range(n_cap, 0, -1):
            if _max_tokens_for(n, ask, rem) >= ask.max_tokens:
                return n, ask.max_tokens
        m = _max_tokens_for(1, ask, rem)
        if m >= ask.min_tokens:
            return 1, m
        return _binding_unit(ask, rem)


def worst_usage(n: int, max_tokens: int, prompt_tokens: int) -> Usage:
    return Usage(generations=n, input_tokens=prompt_tokens, output_tokens=n * max_tokens)


def overrun(grant: Grant, usage: Usage) -> Overrun:
    """The part of ``usage`` above what ``grant`` set aside, unit by unit. Input tokens past the
    reservation are priced as the uncached ones first (a prefix cache serves the start of a prompt,
    the reservation counted the start), so its dollars are a part of the call's own charge."""
    over_in = max(0, usage.input_tokens - grant.worst.input_tokens)
    over_out = max(0, usage.output_tokens - grant.worst.output_tokens)
    if not (over_in or over_out):
        return Overrun()
    over_cached = max(0, over_in - (usage.input_tokens - usage.cached_input_tokens))
    return Overrun(over_in, over_out, grant.price.cost(over_in, over_out, over_cached), 1)


def _max_tokens_for(n: int, ask: Ask, rem: Remaining) -> int:
    """The most output tokens per sample that n samples may have; negative when none fit."""
    inp = ask.prompt_tokens
    bound = ask.max_tokens
    if rem.input_tokens is not None and inp > rem.input_tokens:
        return -1
    if rem.output_tokens is not None:
        bound = min(bound, rem.output_tokens // n)
    if rem.total_tokens is not None:
        bound = min(bound, (rem.total_tokens - inp) // n)
    if rem.usd is not None:
        in_cost = inp * ask.price.per_input_token()
        if in_cost > rem.usd:
            return -1
        per_out = ask.price.per_output_token()
        if per_out > 0:
            bound = min(bound, math.floor((rem.usd - in_cost) / (n * per_out)))
    return bound


def _input_fits(ask: Ask, rem: Remaining) -> bool:
    """Whether an input-only call's input fits (it generates nothing, so output limits never bind)."""
    inp = ask.prompt_tokens
    return ((rem.input_tokens is None or inp <= rem.input_tokens)
            and (rem.total_tokens is None or inp <= rem.total_tokens)
            and (rem.usd is None or inp * ask.price.per_input_token() <= rem.usd))


def _binding_unit(ask: Ask, rem: Remaining) -> str:
    need = (f"an input of {ask.prompt_tokens} tokens" if ask.max_tokens == 0
            else f"one sample of {ask.min_tokens} tokens after a {ask.prompt_tokens}-token prompt")
    for unit in ("input_tokens", "output_tokens", "total_tokens", "usd"):
        value = getattr(rem, unit)
        if value is not None:
            probe = Remaining(**{**{k: None for k in Remaining.__slots__}, unit: value})
            if (not _input_fits(ask, probe)) if ask.max_tokens == 0 else (
                    _max_tokens_for(1, ask, probe) < ask.min_tokens):
                return f"{unit}: {float(value) if unit == 'usd' else value} left, not enough for {need}"
    return f"budget too small for {need}"
