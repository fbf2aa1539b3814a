"""Where a batch's per-prompt work runs: here (``LocalExecutor``, the default) or on remote
workers (``RemoteExecutor``; ``allocate.ray_executor`` sends its jobs to a Ray cluster).

The engine decides everything at round barriers and hands each prompt's round to an executor as
``Work``. Locally the algorithm runs on the prompt's child ledger, as it always did. Ledgers are
live objects of the driver and cannot travel, so remotely the accounting is kept as follows:

1. Before a job is sent, the driver holds (``Ledger.hold``) everything the round may spend: per
   unit, the least of what the prompt's ledger has left and what the ledgers above it allow it.
   In a round run one prompt at a time that is what the parent has left, as locally; in a round
   run together (all worst cases fit the parent) it is the prompt's share from ``round_caps``,
   its worst case plus an even part of the slack, so the holds never compete.
2. The worker runs the algorithm on stand-ins of the two ledgers (``Ledger.standing_in``), with
   exactly what remained of each, so every call is clamped, refused and explained as it would
   have been here.
3. The driver settles the hold with what the worker's ledger spent, adds its call records, and
   takes over the backend's state (a replayed bank's serving position).

A worker that fails inside the algorithm reports what it spent, like a local failure; a worker
that is lost leaves its spend unknown, so its whole hold is charged, flagged estimated (calls it
made may have been billed). Nothing is ever left held.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Protocol

from apportion.algorithms.base import Algorithm
from apportion.allocate.remote import Job, Reply, lane_of, spec_for, take_over
from apportion.budget.ledger import HELD_UNITS, Ledger, Remaining
from apportion.budget.units import Budget, Price, Spend
from apportion.errors import ApportionError, BudgetError, RunFailed
from apportion.lm.base import Backend
from apportion.result import Candidate, Result

# A deadline already passed, as a Budget can state it (its limits must be positive).
_INSTANT = 1e-9


@dataclass(frozen=True, slots=True)
class Work:
    """One prompt's round: what to run, on which backend, against which ledger."""

    algorithm: Algorithm
    backend: Backend
    prompt: str
    ledger: Ledger
    seed: int | None
    prior: tuple[Candidate, ...]
    cap: Remaining | None = None
    """The most of the ledgers above ``ledger`` this round may use, in a round run together
    (``round_caps``); None: whatever they have left, the round running one prompt at a time."""


class Executor(Protocol):
    async def run(self, work: Work) -> Result:
        """The round's result; raises as ``Algorithm.run`` does (RunFailed, ApportionError)."""


class LocalExecutor:
    """In this process, on the prompt's own ledger."""

    async def run(self, work: Work) -> Result:
        return await work.algorithm.run(work.backend, work.prompt, work.ledger, seed=work.seed, prior=work.prior)


class WorkerFailed(ApportionError):
    """A remote worker failed or was lost while running a prompt's round."""


class RemoteError(ApportionError):
    """An ApportionError raised on a worker, its message kept."""


class JobNotSent(ApportionError):
    """A job could not be handed to a worker: nothing ran."""


def round_caps(left: Remaining, worst: Sequence[dict[str, float] | None]) -> list[Remaining]:
    """Shares of ``left`` for a round run together: per limited unit, each prompt's worst case
    (0 where it has none) plus an even part of what the worst cases leave. They never sum to more
    than ``left``, and where the worst cases hold no share binds: a worker given one is clamped
    exactly as a local run, which the parent never clamps in such a round."""
    k = max(len(worst), 1)
    caps: list[dict[str, Any]] = [{u: None for u in (*HELD_UNITS, "seconds")} for _ in worst]
    for unit in HELD_UNITS:
        have = getattr(left, unit)
        if have is None:
            continue
        if unit == "usd":
            base: list[Any] = [Fraction((w or {}).get(unit, 0.0)) for w in worst]
            extra: Any = (Fraction(have) - sum(base)) / k
        else:
            base = [math.floor((w or {}).get(unit, 0.0)) for w in worst]
            extra = (have - sum(base)) // k
        for cap, b in zip(caps, base):
            cap[unit] = max(b + extra, 0)
    return [Remaining(**cap) for cap in caps]


class RemoteExecutor:
    """Each prompt's round as a ``Job`` for ``submit`` to run on a worker, with the accounting of
    the module docstring. Jobs on one replayed question run one after another (they continue
    one serving order); any others at once, as the engine's concurrency allows."""

    def __init__(self, submit: Callable[[Job], Awaitable[Reply]]) -> None:
        self._submit = submit
        self._lanes: dict[tuple[int, str], asyncio.Lock] = {}

    async def run(self, work: Work) -> Result:
        lane = lane_of(work.backend, work.prompt)
        guard: AbstractAsyncContextManager[Any] = (
            nullcontext() if lane is None else self._lanes.setdefault(lane, asyncio.Lock()))
        async with guard:
            return await self._run(work)

    async def _run(self, work: Work) -> Result:
        spec = spec_for(work.backend, work.prompt)  # inside the lane: where the last job ended
        ledger, above = work.ledger, work.ledger.parent
        own = ledger.remaining()
        above_left = None if above is None else _least(_chain_left(above), work.cap)
        amounts = _held_amounts(own, above_left)
        held = ledger.hold(amounts)
        if held is None:  # pragma: no cover - the amounts are what the ledgers have left
            raise BudgetError("could not hold what the ledgers have left")
        job = Job(work.algorithm, spec, work.prompt, work.seed, work.prior, _own_budget(ledger), own,
                  None if above is None or above_left is None else _above_budget(above, above_left), above_left,
                  tuple(ledger.trace))
        try:
            reply = await self._submit(job)
        except JobNotSent:
            ledger.release_hold(held)
            raise
        except BaseException as exc:  # lost, or cancelled while it ran: what it spent is unknown
            ledger.settle_hold(held, _all_of(amounts, work.backend.price))
            if isinstance(exc, Exception):
                raise WorkerFailed(f"the worker was lost ({brief(exc)}); its whole allowance is charged, "
                                   "as calls it made may have been billed") from exc
            raise
        ledger.settle_hold(held, reply.spent, reply.calls)
        ledger.exhausted_reason = reply.exhausted_reason
        if above is not None and work.cap is None and reply.above_exhausted_reason is not None:
            above.exhausted_reason = reply.above_exhausted_reason  # the stand-in was the parent itself
        take_over(work.backend, spec, reply.backend_state)
        if reply.failure == "run-failed" and reply.result is not None:
            raise RunFailed(reply.message or "no candidate drawn", _whole(reply.result, ledger))
        if reply.failure == "error":
            raise RemoteError(reply.message or "failed on the worker")
        if reply.failure is not None or reply.result is None:
            raise WorkerFailed(f"the worker failed: {reply.message}")
        return _whole(reply.result, ledger)


def brief(exc: BaseException, limit: int = 240) -> str:
    """An exception in one short line: a cluster's errors carry tracebacks and whole task arguments."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit or len(lines) > 1 else ''}"


def _whole(result: Result, ledger: Ledger) -> Result:
    """A worker's result as a local run would have returned it: the prompt's spend and limits
    over all its rounds, and its ledger's state."""
    return replace(result, spent=ledger.spend(), budget=ledger.budget, exhausted=ledger.exhausted,
                   exhausted_reason=ledger.exhausted_reason, trace=tuple(ledger.trace))


def _least(a: Remaining, b: Remaining | None) -> Remaining:
    if b is None:
        return a
    values: dict[str, Any] = {}
    for unit in (*HELD_UNITS, "seconds"):
        x, y = getattr(a, unit), getattr(b, unit)
        values[unit] = x if y is None else y if x is None else min(x, y)
    return Remaining(**values)


def _chain_left(ledger: Ledger) -> Remaining:
    """What ``ledger`` and every ledger above it allow, unit by unit."""
    left, up = ledger.remaining(), ledger.parent
    while up is not None:
        left, up = _least(left, up.remaining()), up.parent
    return left


def _held_amounts(own: Remaining, above: Remaining | None) -> Remaining:
    least = _least(own, above)
    return Remaining(**{u: None if getattr(least, u) is None else max(getattr(least, u), 0) for u in HELD_UNITS},
                     seconds=None)


def _own_budget(ledger: Ledger) -> Budget:
    """The ledger's limits, its own deadline counted from now."""
    b = ledger.budget
    return b if b.seconds is None else replace(b, seconds=max(b.seconds - ledger.elapsed(), _INSTANT))


def _above_budget(ledger: Ledger, left: Remaining) -> Budget:
    """One budget for the ledgers from ``ledger`` up: each unit ``left`` limits at the nearest
    such ledger's limit, and their deadline counted from now."""
    limits: dict[str, Any] = {}
    for unit in HELD_UNITS:
        if getattr(left, unit) is None:
            continue
        up: Ledger | None = ledger
        while up is not None and getattr(up.budget, unit) is None:
            up = up.parent
        if up is not None:
            limits[unit] = getattr(up.budget, unit)
    seconds = ledger.seconds_left()
    if seconds is not None:
        limits["seconds"] = max(seconds, _INSTANT)
    return Budget(**limits)


def _all_of(amounts: Remaining, price: Price) -> Spend:
    """A whole hold as spend: what a lost worker is charged."""
    inp = amounts.input_tokens or 0
    out = amounts.output_tokens if amounts.output_tokens is not None else (
        amounts.total_tokens - inp if amounts.total_tokens is not None else 0)
    if amounts.total_tokens is not None:
        inp = min(inp, amounts.total_tokens)
        out = min(out, amounts.total_tokens - inp)
    usd = amounts.usd if amounts.usd is not None else price.cost(inp, out)
    return Spend(generations=amounts.generations or 0, tool_calls=amounts.tool_calls or 0, input_tokens=inp,
                 output_tokens=out, usd=Fraction(usd), calls=1, estimated=True)
