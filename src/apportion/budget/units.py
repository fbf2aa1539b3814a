"""Budgets (what may be spent), usage (what one call consumed) and spend (what was consumed).

Money is held as :class:`fractions.Fraction` so that "spent <= limit" is decided exactly; a float
sum of many tiny per-token prices would drift across the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import lru_cache
from typing import Any

from apportion.errors import BudgetError

TOKEN_UNITS = ("input_tokens", "output_tokens", "total_tokens")
_WHOLE_UNITS = ("generations", *TOKEN_UNITS, "tool_calls")

# Aliases accepted by Budget.parse; the canonical names are the dataclass fields.
_ALIASES = {
    "generations": "generations",
    "gen": "generations",
    "gens": "generations",
    "n": "generations",
    "samples": "generations",
    "input_tokens": "input_tokens",
    "input": "input_tokens",
    "in": "input_tokens",
    "output_tokens": "output_tokens",
    "output": "output_tokens",
    "out": "output_tokens",
    "total_tokens": "total_tokens",
    "tokens": "total_tokens",
    "tok": "total_tokens",
    "usd": "usd",
    "dollars": "usd",
    "$": "usd",
    "seconds": "seconds",
    "s": "seconds",
    "sec": "seconds",
    "deadline": "seconds",
    "time": "seconds",
    "tool_calls": "tool_calls",
    "tool-calls": "tool_calls",
    "tools": "tool_calls",
    "tool": "tool_calls",
}


def to_fraction(value: float | int | str | Fraction) -> Fraction:
    """Exact money value; floats go through their shortest repr so 0.1 means one tenth."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, float):
        return Fraction(repr(value))
    return Fraction(value)


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits on what a run may spend. Unset means unlimited in that unit; at least one is set.

    ``generations`` counts sampled answers from the policy model (scorer calls are reported apart,
    see docs/budget.md); tokens, dollars and seconds cover every call, scorers included.
    ``tool_calls`` counts runs of a tool (a sandboxed program): a second axis, apart from the
    model's; a tool run costs no tokens or dollars, and seconds bind it too.
    """

    generations: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    usd: float | None = None
    seconds: float | None = None
    tool_calls: int | None = None

    def __post_init__(self) -> None:
        set_any = False
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            set_any = True
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BudgetError(f"budget {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise BudgetError(f"budget {f.name} must be > 0, got {value!r}")
            if f.name in _WHOLE_UNITS:
                if not float(value).is_integer():
                    raise BudgetError(f"budget {f.name} must be a whole number, got {value!r}")
                object.__setattr__(self, f.name, int(value))
        if not set_any:
            raise BudgetError(
                "a budget needs at least one limit: generations, input_tokens, output_tokens, "
                "total_tokens, usd, seconds or tool_calls"
            )

    @classmethod
    def parse(cls, text: str | int | float) -> Budget:
        """``"8"`` is eight generations; ``"gen=8,tokens=4000,usd=0.02,s=30,tools=4"`` sets several units."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(generations=text)  # type: ignore[arg-type]
        raw = str(text).strip()
        if not raw:
            raise BudgetError("empty budget")
        if "=" not in raw:
            return cls(generations=_number(raw, "generations"))  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        for part in raw.split(","):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            if not sep:
                raise BudgetError(f"budget part {part!r} is not unit=value")
            unit = _ALIASES.get(key.strip().lower())
            if unit is None:
                known = ", ".join(sorted(set(_ALIASES.values())))
                raise BudgetError(f"unknown budget unit {key.strip()!r}; known units: {known}")
            if unit in values:
                raise BudgetError(f"budget unit {unit} given twice")
            values[unit] = _number(val.strip(), unit)
        return cls(**values)

    def limits(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to_dict(self) -> dict[str, float | int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.limits().items())


def _number(text: str, unit: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise BudgetError(f"budget {unit} must be a number, got {text!r}") from None
    return int(value) if unit in _WHOLE_UNITS and value.is_integer() else value


_FREE = Fraction(0)


@lru_cache(maxsize=256)
def _per_token(per_mtok: float) -> Fraction:
    """Exact dollars per token of a price per million tokens, worked out once per price (every call
    is charged at its model's)."""
    return to_fraction(per_mtok) / 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    """Dollars per million input and output tokens, and per million cached input tokens: the part
    of a prompt a server served from its prefix cache, which hosted APIs bill at a discount (None:
    the input price). A cached price above the input price is refused: a reservation, made before
    anyone knows what will be cached, charges every input token the input price, so that price must
    be the most an input token can cost."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            value = getattr(self, name)
            if value is None and name == "cached_input_per_mtok":
                continue
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not valid or value < 0 or not math.isfinite(value):
                raise BudgetError(f"price {name} must be a number >= 0, got {value!r}")
        cached = self.cached_input_per_mtok
        if cached is not None and cached > self.input_per_mtok:
            raise BudgetError(f"price cached_input_per_mtok ({cached!r}) must not exceed input_per_mtok "
                              f"({self.input_per_mtok!r}): reservations charge every input token the input price")

    @property
    def free(self) -> bool:
        return self.input_per_mtok == 0 and self.output_per_mtok == 0

    def per_input_token(self) -> Fraction:
        """The most one input token can cost (what reservations charge it)."""
        return _per_token(self.input_per_mtok)

    def per_cached_input_token(self) -> Fraction:
        """What an input token served from the server's prefix cache costs."""
        cached = self.cached_input_per_mtok
        return self.per_input_token() if cached is None else _per_token(cached)

    def per_output_token(self) -> Fraction:
        return _per_token(self.output_per_mtok)

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> Fraction:
        """Exact dollars; ``cached_input_tokens`` are the part of ``input_tokens`` charged the
        cached price (0, the default, is the worst case: every input token at the input price)."""
        if not 0 <= cached_input_tokens <= max(input_tokens, 0):
            raise BudgetError(f"cached input tokens ({cached_input_tokens}) must be between 0 and the "
                              f"input tokens ({input_tokens})")
        if self.free:  # every call is charged at least twice (reserved, settled): skip the arithmetic
            return _FREE
        out = input_tokens * self.per_input_token() + output_tokens * self.per_output_token()
        if cached_input_tokens:
            out -= cached_input_tokens * (self.per_input_token() - self.per_cached_input_token())
        return out

    def charge(self, usage: Usage) -> Fraction:
        """What ``usage`` costs, its cached input tokens at the cached price."""
        return self.cost(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens)

    def to_text(self) -> str:
        """The form ``parse`` reads back: ``"in=X,out=Y"``, with ``cached=Z`` where set."""
        cached = "" if self.cached_input_per_mtok is None else f",cached={self.cached_input_per_mtok!r}"
        return f"in={self.input_per_mtok!r}{cached},out={self.output_per_mtok!r}"

    @classmethod
    def parse(cls, text: str) -> Price:
        """``"0.15,0.6"`` or ``"in=0.15,out=0.6"``: dollars per million input / output tokens;
        ``"0.15,0.075,0.6"`` or ``"in=0.15,cached=0.075,out=0.6"`` add the cached input price
        (positional order as vendors list them: input, cached input, output)."""
        usage = (f"cannot read price {text!r}; expected 'IN,OUT', 'IN,CACHED,OUT' or 'in=X,cached=Y,out=Z' "
                 "(USD per 1M tokens; cached is optional)")
        names = {"in": "input_per_mtok", "input": "input_per_mtok",
                 "cached": "cached_input_per_mtok", "cached_input": "cached_input_per_mtok",
                 "cached-input": "cached_input_per_mtok",
                 "out": "output_per_mtok", "output": "output_per_mtok"}
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) == 2:
            positions: tuple[str, ...] = ("input_per_mtok", "output_per_mtok")
        elif len(parts) == 3:
            positions = ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
        else:
            raise BudgetError(usage)
        values: dict[str, float] = {}
        for position, part in zip(positions, parts):
            key, sep, val = part.rpartition("=")
            name = names.get(key.strip().lower()) if sep else position
            if name is None or name in values:
                raise BudgetError(usage)
            try:
                values[name] = float(val)
            except ValueError:
                raise BudgetError(f"price {name} must be a number, got {val!r}") from None
        if "input_per_mtok" not in values or "output_per_mtok" not in values:
            raise BudgetError(usage)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Usage:
    """What one backend call consumed, as the backend reported it (or counted it, if ``estimated``)."""

    generations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    tool_calls: int = 0
    """Tool runs (sandboxed programs); a backend's usage never has any."""
    cached_input_tokens: int = 0
    """The part of ``input_tokens`` the server served from its prefix cache (billed at the cached
    input price); never more than ``input_tokens``."""

    def __post_init__(self) -> None:
        if self.cached_input_tokens and not 0 <= self.cached_input_tokens <= self.input_tokens:
            raise BudgetError(f"cached input tokens ({self.cached_input_tokens}) must be between 0 and the "
                              f"input tokens ({self.input_tokens})")

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.generations + other.generations,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.estimated or other.estimated,
            self.tool_calls + other.tool_calls,
            self.cached_input_tokens + other.cached_input_tokens,
        )


@dataclass(frozen=True, slots=True)
class Overrun:
    """Spend a server forced past what was reserved for its calls: tokens of choices nobody asked
    for, samples longer than ``max_tokens``, a prompt larger than the server's own count of it.
    Charged (a paid API bills it) and shown apart: it is the server's doing, not the engine's."""

    input_tokens: int = 0
    output_tokens: int = 0
    usd: Fraction = Fraction(0)
    calls: int = 0

    def __add__(self, other: Overrun) -> Overrun:
        return Overrun(self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens,
                       self.usd + other.usd, self.calls + other.calls)

    def to_dict(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "total_tokens": self.input_tokens + self.output_tokens, "usd": float(self.usd),
                "calls": self.calls}


@dataclass(frozen=True, slots=True)
class Spend:
    """What a run consumed, in every unit. ``usd`` is exact (a Fraction); ``to_dict`` gives floats.
    ``overrun`` is the part of it a server forced past the reservations (see Overrun)."""

    generations: int = 0
    scorer_generations: int = 0
    continuations: int = 0
    """Continuation calls' pieces of solutions already counted in ``generations`` (budget
    forcing): charged in tokens, dollars and time, never as generations."""
    planning_generations: int = 0
    """Calls that decide how to answer (TALE's token-budget estimate), charged like scorers."""
    tool_calls: int = 0
    """Tool runs (program-aided answers' sandboxed programs): the ``tool_calls`` unit."""
    input_tokens: int = 0
    output_tokens: int = 0
    usd: Fraction = Fraction(0)
    seconds: float = 0.0
    calls: int = 0
    estimated: bool = False
    overrun: Overrun = field(default_factory=Overrun)
    cached_input_tokens: int = 0
    """The part of ``input_tokens`` servers served from their prefix caches (charged at the cached
    input price where the model's price has one)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def violations(self, budget: Budget) -> list[str]:
        """The limits this spend passes by the engine's own doing (the server's overrun set
        aside): always empty, unless the ledger is broken."""
        o = self.overrun
        own: dict[str, tuple[Fraction, float | int | None]] = {
            "generations": (Fraction(self.generations), budget.generations),
            "tool_calls": (Fraction(self.tool_calls), budget.tool_calls),
            "input_tokens": (Fraction(self.input_tokens - o.input_tokens), budget.input_tokens),
            "output_tokens": (Fraction(self.output_tokens - o.output_tokens), budget.output_tokens),
            "total_tokens": (Fraction(self.total_tokens - o.input_tokens - o.output_tokens), budget.total_tokens),
            "usd": (self.usd - o.usd, budget.usd),
        }
        return [f"{unit}: {float(spent):g} > {limit:g}" for unit, (spent, limit) in own.items()
                if limit is not None and spent > to_fraction(limit)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "generations": self.generations,
            "scorer_generations": self.scorer_generations,
            "continuations": self.continuations,
            "planning_generations": self.planning_generations,
            "tool_calls": self.tool_calls,
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "usd": float(self.usd),
            "seconds": round(self.seconds, 4),
            "calls": self.calls,
            "estimated": self.estimated,
            "server_overrun": self.overrun.to_dict(),
        }
