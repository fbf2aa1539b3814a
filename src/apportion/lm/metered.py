"""A backend seen through a ledger: every call is reserved, clamped, made, and settled.

Algorithms and scorers never call a backend directly; they call a MeteredLM, so the budget
holds for all of them without each one re-implementing checks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from apportion.budget.ledger import Ask, CallRecord, Grant, Ledger
from apportion.budget.units import Usage
from apportion.errors import BackendError, BudgetExhausted
from apportion.lm.base import Backend, Completion, Prompt, SamplingParams

# Past the deadline a backend that cannot stop mid-request gets this long to return before it
# is cancelled; the cancelled call is then charged its reservation.
_DEADLINE_GRACE_S = 0.25


class MeteredLM:
    """``backend`` charged to ``ledger``. ``kind`` is "policy" for samples that answer the
    question and "scorer" for judge calls (charged tokens, dollars and time, not generations)."""

    def __init__(self, backend: Backend, ledger: Ledger, *, kind: str = "policy") -> None:
        if kind not in ("policy", "scorer"):
            raise ValueError(f"kind must be 'policy' or 'scorer', got {kind!r}")
        self.backend = backend
        self.ledger = ledger
        self.kind = kind

    def scorer(self, backend: Backend | None = None) -> MeteredLM:
        """The same ledger, charged as scoring, through ``backend`` (default: this one's)."""
        return MeteredLM(backend or self.backend, self.ledger, kind="scorer")

    async def generate(self, prompt: Prompt, params: SamplingParams, *, min_tokens: int = 1) -> Completion:
        """Sample at most ``params.n`` continuations of at most ``params.max_tokens`` tokens each;
        fewer or shorter where the budget says so. Raises BudgetExhausted when nothing fits."""
        backend = self.backend
        prompt_tokens = await backend.prompt_tokens(prompt)
        ask = Ask(
            n=params.n,
            max_tokens=params.max_tokens,
            prompt_tokens=prompt_tokens,
            prompt_shared=backend.capabilities.native_n,
            price=backend.price,
            scorer=self.kind == "scorer",
            min_tokens=min(min_tokens, params.max_tokens),
        )
        grant = self.ledger.reserve(ask)
        if grant is None:
            raise BudgetExhausted(self.ledger.exhausted_reason or "budget exhausted")
        granted = replace(params, n=grant.n, max_tokens=grant.max_tokens)
        deadline = self.ledger.deadline()
        started = time.monotonic()
        try:
            if deadline is None:
                completion = await backend.generate(prompt, granted)
            else:
                timeout = max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S
                async with asyncio.timeout(timeout):
                    completion = await backend.generate(prompt, granted, deadline=deadline)
        except TimeoutError:
            self._settle_unknown(grant, params, started, "cancelled at the deadline")
            raise BudgetExhausted("seconds: deadline reached during a call") from None
        except asyncio.CancelledError:
            self._settle_unknown(grant, params, started, "cancelled")
            raise
        except BackendError as exc:
            consumed: Usage | None = getattr(exc, "usage", None)
            if consumed is None:
                self.ledger.release(grant)
            else:
                self._settle(grant, params, consumed, started, (), error=str(exc))
            raise
        except BaseException:
            self.ledger.release(grant)
            raise
        notes = completion.notes
        if grant.clamped:
            notes = (f"budget clamped n {params.n}->{grant.n}, max_tokens "
                     f"{params.max_tokens}->{grant.max_tokens}", *notes)
        self._settle(grant, params, completion.usage, started, notes)
        if completion.samples and any(s.finish_reason == "deadline" for s in completion.samples):
            self.ledger.exhausted_reason = self.ledger.exhausted_reason or "seconds: deadline reached"
        return completion

    def _settle(self, grant: Grant, asked: SamplingParams, usage: Usage, started: float,
                notes: tuple[str, ...], error: str | None = None) -> None:
        usd = grant.price.cost(usage.input_tokens, usage.output_tokens)
        if usage.output_tokens > grant.worst.output_tokens or usage.input_tokens > grant.worst.input_tokens:
            notes = (*notes, "usage above the reserved worst case (charged as reported)")
        record = CallRecord(
            kind=self.kind,
            model=self.backend.model,
            n_asked=asked.n,
            n_granted=grant.n,
            max_tokens_asked=asked.max_tokens,
            max_tokens_granted=grant.max_tokens,
            usage=usage,
            usd=float(usd),
            latency_s=time.monotonic() - started,
            notes=notes,
            error=error,
        )
        self.ledger.settle(grant, usage, record)

    def _settle_unknown(self, grant: Grant, asked: SamplingParams, started: float, why: str) -> None:
        """A call cut off before it reported usage may still have consumed tokens upstream; the
        only safe figure is its worst case, marked as an estimate."""
        worst = replace(grant.worst, estimated=True)
        self._settle(grant, asked, worst, started, (f"{why}: charged the reserved worst case",))
