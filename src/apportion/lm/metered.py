"""A backend seen through a ledger: every request is reserved, clamped, made, and settled.

Algorithms and scorers never call a backend directly; they call a MeteredLM, so the budget holds
for all of them without each one re-implementing checks. A backend makes one request per
``generate`` and returns what it got. Everything further is another request, reserved like the
first and refused when the budget cannot pay for it: the samples a short reply left out, a retry
after a reply that was paid for but unusable, one request per sample for a server that ignores
``n``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from apportion.budget.ledger import CALL_KINDS, Ask, CallRecord, Grant, Ledger, overrun
from apportion.budget.units import Usage
from apportion.errors import BackendError, BackendTimeout, BudgetExhausted, DeadlineReached
from apportion.lm.base import Backend, Completion, Prompt, Sample, SamplingParams, cut_point

# Past the deadline a backend that cannot stop mid-request gets this long to return before it
# is cancelled; the cancelled call is then charged its reservation.
_DEADLINE_GRACE_S = 0.25
# A call gives up after this many rounds of requests in a row that add no sample (a server that
# keeps failing, perhaps billing each time), or after this many hangs (each costs a whole timeout).
MAX_FRUITLESS_ROUNDS = 4
MAX_TIMEOUTS = 2


@dataclass(slots=True)
class _Draw:
    """What one ``generate`` has gathered so far, over all its requests."""

    samples: list[Sample] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    notes: list[str] = field(default_factory=list)
    errors: list[BackendError] = field(default_factory=list)
    requests: int = 0
    backend: str = ""

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


class MeteredLM:
    """``backend`` charged to ``ledger``. ``kind`` is "policy" for samples that answer the
    question; "scorer" (judge calls), "continuation" (more of a solution already drawn: budget
    forcing) and "planning" (TALE's budget estimate) are charged tokens, dollars and time, not
    generations."""

    def __init__(self, backend: Backend, ledger: Ledger, *, kind: str = "policy") -> None:
        if kind not in CALL_KINDS or kind == "tool":  # tool runs go through tools.MeteredSandbox
            raise ValueError(f"kind must be one of {[k for k in CALL_KINDS if k != 'tool']}, got {kind!r}")
        self.backend = backend
        self.ledger = ledger
        self.kind = kind

    def scorer(self, backend: Backend | None = None) -> MeteredLM:
        """The same ledger, charged as scoring, through ``backend`` (default: this one's)."""
        return MeteredLM(backend or self.backend, self.ledger, kind="scorer")

    def continuation(self) -> MeteredLM:
        """The same backend and ledger, charged as continuing solutions already counted: a
        budget of one generation still pays for them, in tokens, dollars and time."""
        return MeteredLM(self.backend, self.ledger, kind="continuation")

    def planning(self) -> MeteredLM:
        """The same backend and ledger, charged as planning (deciding how to answer, not an
        answer): tokens, dollars and time, not generations."""
        return MeteredLM(self.backend, self.ledger, kind="planning")

    async def generate(self, prompt: Prompt, params: SamplingParams, *, min_tokens: int = 1) -> Completion:
        """Up to ``params.n`` samples of at most ``params.max_tokens`` tokens each; fewer or
        shorter where the budget says so.

        Raises BudgetExhausted when the ledger refuses the first request, and the backend's error
        when requests fail for good before any sample is drawn. Samples drawn before a failure are
        returned with the failure in ``Completion.error``: paid work is never thrown away.
        """
        started = time.monotonic()
        prompt_tokens = await self.backend.prompt_tokens(prompt)
        draw = _Draw(backend=self.backend.name)
        # The samples not drawn yet, by index: sample i is asked for with seed params.seed + i, so
        # no two samples share a seed and one whose request failed is asked for again with its own.
        pending = list(range(params.n))
        drawn: dict[int, Sample] = {}
        fruitless = timeouts = 0
        # One choice back for n > 1 is what a server ignoring n sends: the rest of this draw goes
        # out as concurrent single requests at once (one more round trip, not one per sample
        # while the backend gathers evidence). They cost what that server charges anyway.
        singles = False
        while pending:
            batched = len(pending) == 1 or (self.backend.capabilities.native_n and not singles)
            slices = [pending] if batched else [[i] for i in pending]
            grants = self._reserve([len(sl) for sl in slices], prompt_tokens, params, min_tokens)
            if not grants:
                break
            before = len(drawn)
            results = await self._round(prompt, params, grants, [sl[0] for sl in slices])
            draw.requests += len(grants)
            stop, wait = False, 0.0
            for indices, grant, r in zip(slices, grants, results):
                if isinstance(r, Completion):
                    drawn.update(zip(indices, r.samples))
                    # asked as granted: a budget that allowed one sample says nothing of the server
                    singles = singles or (grant.n > 1 and len(r.samples) == 1)
                    draw.usage = draw.usage + r.usage
                    for note in r.notes:
                        draw.note(note)
                elif isinstance(r, BudgetExhausted):
                    stop = True
                elif isinstance(r, BackendError):
                    draw.errors.append(r)
                    stop = stop or not r.retryable
                    timeouts += isinstance(r, BackendTimeout)
                    wait = max(wait, r.retry_after)
                else:
                    raise r
            pending = [i for i in pending if i not in drawn]
            fruitless = fruitless + 1 if len(drawn) == before else 0
            if stop or fruitless >= MAX_FRUITLESS_ROUNDS or timeouts >= MAX_TIMEOUTS:
                break
            left = self.ledger.seconds_left()
            if wait > 0 and (left is None or wait < left):
                await asyncio.sleep(wait)
        draw.samples = [drawn[i] for i in sorted(drawn)]
        if params.cut is not None and not self.backend.capabilities.cut:
            draw.samples = _cut_afterwards(draw, params)
        if not draw.samples:
            if draw.errors:
                raise draw.errors[-1]
            raise BudgetExhausted(self.ledger.exhausted_reason or "budget exhausted")
        if draw.requests > 1:
            draw.note(f"{len(draw.samples)} of n={params.n} samples in {draw.requests} requests")
        error = draw.errors[-1] if draw.errors and len(draw.samples) < params.n else None
        if error is not None:
            draw.note(f"stopped after a failure, keeping the {len(draw.samples)} samples drawn: {error}")
        return Completion(tuple(draw.samples), draw.usage, self.backend.model, time.monotonic() - started,
                          tuple(draw.notes), error)

    async def _round(self, prompt: Prompt, params: SamplingParams, grants: list[Grant],
                     first_indices: list[int]) -> list[Completion | BaseException]:
        """The round's requests, concurrently, each settling its own grant. A grant whose request
        never started (the caller was cancelled first) is given back here: nothing was sent."""
        started: set[int] = set()
        try:
            if len(grants) == 1:  # the usual round, one request: awaited here, without a task of its own
                try:
                    return [await self._request(prompt, params, grants[0], first_indices[0], started)]
                except Exception as exc:  # handed back, as gather(return_exceptions=True) does
                    return [exc]
            return await asyncio.gather(
                *(self._request(prompt, params, g, i, started) for g, i in zip(grants, first_indices)),
                return_exceptions=True)
        except asyncio.CancelledError:
            for grant in grants:
                if grant.id not in started:
                    self.ledger.release(grant)
            raise

    def _reserve(self, sizes: list[int], prompt_tokens: int, params: SamplingParams,
                 min_tokens: int) -> list[Grant]:
        """One grant per request, in order, until the ledger refuses one."""
        grants = []
        for size in sizes:
            grant = self.ledger.reserve(Ask(
                n=size, max_tokens=params.max_tokens, prompt_tokens=prompt_tokens, price=self.backend.price,
                kind=self.kind, min_tokens=min(min_tokens, params.max_tokens)))
            if grant is None:
                break
            grants.append(grant)
        return grants

    async def _request(self, prompt: Prompt, params: SamplingParams, grant: Grant, index: int,
                       started_grants: set[int]) -> Completion:
        """One backend request within ``grant``, seeded for sample ``index`` (the first it asks
        for); settled whatever happens."""
        started_grants.add(grant.id)  # before any await: from here on, this request settles its grant
        seed = None if params.seed is None else params.seed + index
        granted = params  # as asked (the usual call), or within the grant:
        if (grant.n, grant.max_tokens, seed) != (params.n, params.max_tokens, params.seed):
            granted = replace(params, n=grant.n, max_tokens=grant.max_tokens, seed=seed)
        deadline = self.ledger.deadline()
        started = time.monotonic()
        try:
            if deadline is None:
                completion = await self.backend.generate(prompt, granted)
            else:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic()) + _DEADLINE_GRACE_S):
                    completion = await self.backend.generate(prompt, granted, deadline=deadline)
        except TimeoutError:
            self._settle_unknown(grant, params, started, "cancelled at the deadline")
            raise self._deadline() from None
        except asyncio.CancelledError:
            self._settle_unknown(grant, params, started, "cancelled")
            raise
        except BackendError as exc:
            self._settle_failure(grant, params, started, exc)
            if isinstance(exc, DeadlineReached):
                raise self._deadline() from exc
            raise
        except BaseException:
            self.ledger.release(grant)
            raise
        notes = list(completion.notes)
        samples = completion.samples
        if len(samples) > grant.n:  # a backend should have dropped them; never count them as drawn
            notes.append(f"backend returned {len(samples)} samples for n={grant.n}: kept the first {grant.n}")
            samples = samples[: grant.n]
        if grant.clamped:
            notes.insert(0, f"budget clamped n {params.n}->{grant.n}, max_tokens "
                            f"{params.max_tokens}->{grant.max_tokens}")
        usage = completion.usage
        if usage.generations != len(samples):
            usage = replace(usage, generations=len(samples))
        self._settle(grant, params, usage, started, tuple(notes))
        if any(s.finish_reason == "deadline" for s in samples):
            self.ledger.exhausted_reason = self.ledger.exhausted_reason or "seconds: deadline reached"
        if samples is completion.samples and usage is completion.usage and tuple(notes) == completion.notes:
            return completion  # nothing to change (the usual call): no copy
        return replace(completion, samples=samples, usage=usage, notes=tuple(notes))

    def _deadline(self) -> BudgetExhausted:
        self.ledger.exhausted_reason = self.ledger.exhausted_reason or "seconds: deadline reached"
        return BudgetExhausted("seconds: deadline reached during a call")

    def _settle(self, grant: Grant, asked: SamplingParams, usage: Usage, started: float,
                notes: tuple[str, ...], error: str | None = None) -> None:
        usd = grant.price.charge(usage)
        over = overrun(grant, usage)
        if over.calls:
            notes = (*notes, f"server overran the reservation by {over.input_tokens} input and "
                             f"{over.output_tokens} output tokens (charged as reported, counted as the server's)")
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
            overrun=over,
        )
        self.ledger.settle(grant, usage, record)

    def _settle_failure(self, grant: Grant, asked: SamplingParams, started: float, exc: BackendError) -> None:
        """A failed request costs what it may have cost upstream: nothing if it never reached the
        server, what the server reported if it did, its worst case if that is unknown."""
        if not exc.billed:
            self.ledger.release(grant)
        elif exc.consumed is None:
            self._settle_unknown(grant, asked, started, "failed after reaching the server", error=str(exc))
        else:
            self._settle(grant, asked, replace(exc.consumed, generations=0), started,
                         ("failed after reaching the server: charged what it reported",), error=str(exc))

    def _settle_unknown(self, grant: Grant, asked: SamplingParams, started: float, why: str,
                        error: str | None = None) -> None:
        """A call cut off before it reported usage may still have consumed tokens upstream; the
        only safe figure is its worst case, marked as an estimate. No sample reached us, so no
        generation is counted."""
        worst = replace(grant.worst, generations=0, estimated=True)
        self._settle(grant, asked, worst, started, (f"{why}: charged the reserved worst case",), error)


def _cut_afterwards(draw: _Draw, params: SamplingParams) -> list[Sample]:
    """A backend that cannot stop a sample mid-decode drew it whole: apply the cut to what came
    back, so the algorithm sees the same samples it would have seen live, and keep every token
    charged (the server generated them)."""
    assert params.cut is not None
    out = []
    for sample in draw.samples:
        at = cut_point(sample, params.cut)
        if at is None:
            out.append(sample)
            continue
        out.append(Sample("", "cut", sample.output_tokens, sample.logprobs, sample.confidences))
        draw.note(cut_afterwards_note(draw.backend))
    return out


def cut_afterwards_note(backend: str) -> str:
    """What a call says when ``_cut_afterwards`` cut some of its samples (algorithms pass it on)."""
    return (f"{backend} cannot stop a sample mid-decode: samples were cut after they were drawn, "
            "and all their tokens are charged")
