"""The one metered path for calls that are not a backend's generations: a reward model's forward
pass over some texts, a remote verifier. Reserved at the worst case before the call, settled after
it with what it reported, whatever happened to it, under the same rules as ``lm/metered.py``:

- refused by the ledger: BudgetExhausted, nothing sent;
- a failure that never reached the server (``BackendError.billed`` False): nothing charged;
- a failure after the server took the request: what it reported (``consumed``), else the worst
  case reserved, marked estimated;
- cancelled, or cut off at the run's deadline: the worst case, marked estimated (the deadline
  raises BudgetExhausted, as a backend call cut off there does).

Generations are never counted for such a call unless it says so in its usage (a scorer's
``Usage.generations`` is reported as scoring, never as answers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from apportion.budget.ledger import Ask, CallRecord, Grant, Ledger, overrun
from apportion.budget.units import Usage
from apportion.errors import BackendError, BudgetExhausted, DeadlineReached

T = TypeVar("T")

DEADLINE_GRACE_S = 0.25
"""How long past the run's deadline a call may take to return before it is cancelled."""


@dataclass(frozen=True, slots=True)
class Metered(Generic[T]):
    """What a metered call returns: its value, what it consumed and notes for the trace."""

    value: T
    usage: Usage
    notes: tuple[str, ...] = ()


async def metered_call(ledger: Ledger, ask: Ask, call: Callable[[Grant], Awaitable[Metered[T]]], *,
                       model: str) -> T:
    """``call(grant)`` charged to ``ledger`` as ``ask`` (``Ask.input_only`` for a forward pass),
    under the run's deadline; returns its value. A grant smaller than asked (clamped) is given
    back and refused: such a call cannot be made in part."""
    grant = ledger.reserve(ask)
    if grant is None:
        raise BudgetExhausted(ledger.exhausted_reason or "budget exhausted")
    if grant.clamped:
        ledger.release(grant)
        raise BudgetExhausted(f"budget too small for {ask.n} x {ask.max_tokens} tokens after "
                              f"{ask.prompt_tokens} input tokens")
    deadline = ledger.deadline()
    started = time.monotonic()
    try:
        if deadline is None:
            out = await call(grant)
        else:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S):
                out = await call(grant)
    except TimeoutError:
        _settle_worst(ledger, grant, ask, model, started, "cancelled at the deadline")
        ledger.exhausted_reason = ledger.exhausted_reason or "seconds: deadline reached"
        raise BudgetExhausted("seconds: deadline reached during a call") from None
    except asyncio.CancelledError:
        _settle_worst(ledger, grant, ask, model, started, "cancelled")
        raise
    except BackendError as exc:
        if not exc.billed:
            ledger.release(grant)
        elif exc.consumed is None:
            _settle_worst(ledger, grant, ask, model, started, "failed after reaching the server", str(exc))
        else:
            usage = replace(exc.consumed, generations=min(exc.consumed.generations, grant.n))
            _settle(ledger, grant, ask, model, usage, started,
                    ("failed after reaching the server: charged what it reported",), str(exc))
        if isinstance(exc, DeadlineReached):
            ledger.exhausted_reason = ledger.exhausted_reason or "seconds: deadline reached"
            raise BudgetExhausted(f"seconds: deadline reached during a call ({exc})") from exc
        raise
    except BaseException:
        ledger.release(grant)
        raise
    usage = out.usage
    notes = out.notes
    if usage.generations > grant.n:
        notes = (*notes, f"reported {usage.generations} generations for {grant.n}: counted {grant.n}")
        usage = replace(usage, generations=grant.n)
    _settle(ledger, grant, ask, model, usage, started, notes)
    return out.value


def _settle(ledger: Ledger, grant: Grant, ask: Ask, model: str, usage: Usage, started: float,
            notes: tuple[str, ...], error: str | None = None) -> None:
    over = overrun(grant, usage)
    if over.calls:
        notes = (*notes, f"server overran the reservation by {over.input_tokens} input and "
                         f"{over.output_tokens} output tokens (charged as reported)")
    record = CallRecord(kind=grant.kind, model=model, n_asked=ask.n, n_granted=grant.n,
                        max_tokens_asked=ask.max_tokens, max_tokens_granted=grant.max_tokens, usage=usage,
                        usd=float(grant.price.charge(usage)), latency_s=time.monotonic() - started,
                        notes=notes, error=error, overrun=over)
    ledger.settle(grant, usage, record)


def _settle_worst(ledger: Ledger, grant: Grant, ask: Ask, model: str, started: float, why: str,
                  error: str | None = None) -> None:
    """Cut off before it reported usage: the worst case set aside, marked estimated; no
    generation (nothing came back)."""
    worst = replace(grant.worst, generations=0, estimated=True)
    _settle(ledger, grant, ask, model, worst, started, (f"{why}: charged the reserved worst case",), error)
