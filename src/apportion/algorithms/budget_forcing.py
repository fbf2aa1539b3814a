"""Budget forcing (s1, Muennighoff et al. 2025): a minimum and a maximum of thinking tokens.

A solution is drawn in pieces, each continuing the same assistant turn (``Prompt.assistant_prefix``),
so it works on any backend that can continue one (``capabilities.continuation``):

1. Thinking is sampled with the end-of-thinking marker as a stop string ("</think>" for reasoning
   models; for plain models an answer cue such as "The answer is", so that the reasoning before
   the model's answer is the thinking). The end of the reply ends thinking too.
2. Thinking that ends under ``min_thinking_tokens`` is not accepted: the marker (or the end of the
   reply) is dropped, the text before it kept, ``wait`` ("Wait,") appended, and the solution
   continued. At most ``max_waits`` times.
3. At ``max_thinking_tokens`` thinking is cut: every piece asks for at most what is left of it.
4. Then the model is made to answer: the thinking, the marker and ``answer_cue`` become the prefix
   of one short call of ``answer_tokens``. The answer is read from that part first.

Reasoning servers that return thinking in ``reasoning_content`` (``Sample.reasoning``): the
thinking is read from there, counted and forced on in the same way. A server whose reply holds
both the reasoning and an answer (its stop string did not fire on the marker) has ended thinking;
its tokens are then shared between the two in proportion to their bytes.

Budget meaning: a generation is one finished solution. The first piece of each solution is a
"policy" call (one generation); every further piece, "Wait" continuations and the forced answer,
is a "continuation" call: charged in tokens, dollars and seconds, counted in
``spent.continuations``, never as a generation, so budget forcing runs under ``gen=1``. With token
or dollar limits, each thinking piece is shortened so that the answer after it still fits; a
minimum that the budget cannot pay for is not reached (the result's notes say so). With several
solutions (``samples``, by default the generation budget), the answer is their majority vote.

What it cannot do: count thinking exactly where a server returns reasoning and answer together
(shared by bytes); continue a reasoning server whose chat template drops or rewrites a partial
assistant message (use a raw prompt, or ``HTTPOptions.continuation="chatml"``); make a small model
think usefully: the tokens are forced, not their content.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions
from apportion.algorithms.voting import tally
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import read_answer_for
from apportion.budget.ledger import Ledger, Remaining
from apportion.budget.units import Budget, Price
from apportion.errors import BackendError, BudgetExhausted, ConfigError
from apportion.lm.base import Backend, Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate, Result

# A seed per piece of a solution (sample i's k-th piece: seed + i + stride * k).
_SEED_STRIDE = 7919
# Tokens a tokenizer may add where two texts meet; kept spare when fitting the answer in.
_JOIN_SLACK = 2
_BY_MODEL = "ended by the model"
_UNDER_MIN = "ended by the model under the minimum"
_FAILED = "ended by a failure"


@dataclass(frozen=True, slots=True)
class BudgetForcingOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    min_thinking_tokens: int = 0
    max_thinking_tokens: int | None = None
    """None: ``sampling.max_tokens``."""
    end_marker: str | None = "The answer is"
    """What ends thinking (a stop string); None: only the end of the reply does."""
    answer_cue: str = ""
    """Appended after the marker to make the model answer (e.g. "\\n\\nThe answer is" after "</think>")."""
    wait: str = "Wait,"
    answer_tokens: int = 32
    max_waits: int = 16
    samples: int | None = None
    """Solutions drawn at once; None: as many as the generation budget allows, else one."""

    def __post_init__(self) -> None:
        limit = self.thinking_limit
        if self.min_thinking_tokens < 0:
            raise ConfigError(f"min_thinking_tokens must be >= 0, got {self.min_thinking_tokens}")
        if limit < 1:
            raise ConfigError(f"max_thinking_tokens must be >= 1, got {limit}")
        if self.min_thinking_tokens > limit:
            raise ConfigError(f"min_thinking_tokens ({self.min_thinking_tokens}) is above the maximum ({limit})")
        if self.end_marker is not None and not self.end_marker.strip():
            raise ConfigError("end_marker must be None or a non-empty string")
        if not self.wait.strip():
            raise ConfigError("wait must be a non-empty string")
        if self.answer_tokens < 1 or self.max_waits < 0:
            raise ConfigError("answer_tokens >= 1 and max_waits >= 0 are required")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"samples must be >= 1, got {self.samples}")

    @property
    def thinking_limit(self) -> int:
        return self.max_thinking_tokens if self.max_thinking_tokens is not None else self.sampling.max_tokens

    @classmethod
    def reasoning_model(cls, **kwargs: object) -> BudgetForcingOptions:
        """Markers for models that think between <think> and </think> (DeepSeek-R1, Qwen3, s1)."""
        settings: dict[str, object] = {"end_marker": "</think>", "answer_cue": "\n\nThe answer is",
                                       "wait": "\nWait,", **kwargs}
        return cls(**settings)  # type: ignore[arg-type]


@dataclass(slots=True)
class _Solution:
    """One solution while it is forced."""

    index: int
    thinking: str = ""
    thinking_tokens: int = 0
    tokens: int = 0
    pieces: int = 0
    waits: int = 0
    logprobs: list[float] | None = field(default_factory=list)
    answer_prefix: str | None = None
    """The marker and cue the answer was asked after (None: no answer call was made)."""
    answer_text: str | None = None
    finish: str = "stop"
    ended: str = _BY_MODEL

    def add_tokens(self, sample: Sample) -> None:
        self.tokens += sample.output_tokens
        self.pieces += 1
        if self.logprobs is not None and sample.logprobs is not None:
            self.logprobs.extend(sample.logprobs)
        else:
            self.logprobs = None


class BudgetForcing(Algorithm):
    name = "budget-forcing"

    def __init__(self, options: BudgetForcingOptions | None = None, *,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or BudgetForcingOptions()

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        if not lm.capabilities.continuation:
            raise ConfigError(f"budget forcing continues a solution, which {lm.name} ({lm.model}) cannot do")
        ctx = self.context(lm, prompt, budget, seed, opts.sampling.system_prompt)
        await ctx.apply_prompt_mode(opts.sampling.prompt_mode)
        done: list[_Solution] = []

        def current(final: bool) -> Result:
            candidates = [*prior, *(self._candidate(ctx, sol) for sol in sorted(done, key=lambda s: s.index))]
            t = tally(candidates, ctx.equivalence)
            response = t.candidates[t.winner_index].text if t.winner_index is not None else None
            if final:
                ctx.notes.extend(self._note(sol) for sol in sorted(done, key=lambda s: s.index))
            return ctx.result(answer=t.winner, response=response, candidates=t.candidates,
                              distribution=t.distribution, final=final)

        solutions = await self._first_pieces(ctx)
        active = [len(solutions)]  # solutions still being forced, who share what the budget has left
        tasks = [asyncio.ensure_future(self._finish(ctx, sol, active)) for sol in solutions]
        try:
            for next_done in asyncio.as_completed(tasks):
                done.append(await next_done)
                if len(done) < len(tasks):
                    yield current(final=False)
        finally:
            for task in tasks:
                task.cancel()
        yield current(final=True)

    # -- the pieces of a solution --------------------------------------------------------------

    async def _first_pieces(self, ctx: RunContext) -> list[_Solution]:
        """The first piece of every solution, in one policy call of n samples."""
        opts = self.options
        left = ctx.ledger.remaining().generations
        n = opts.samples or left or 1
        if left is not None:
            n = min(n, left)
        if n < 1:
            ctx.ledger.exhausted_reason = ctx.ledger.exhausted_reason or "generations: none left"
            return []
        room = await self._room(ctx, ctx.prompt, n)
        cap = opts.thinking_limit if room is None else max(1, min(opts.thinking_limit, room))
        params = self._thinking_params(ctx, n, cap, ctx.seed)
        try:
            completion = await ctx.lm.generate(ctx.prompt, params, min_tokens=min(opts.sampling.min_tokens, cap))
        except BudgetExhausted:
            return []
        except BackendError as exc:
            ctx.fail(exc)
            return []
        if completion.error is not None:
            ctx.fail(completion.error)
        solutions = []
        for i, sample in enumerate(completion.samples):
            sol = _Solution(i)
            self._take_thinking(sol, sample)
            solutions.append(sol)
        return solutions

    async def _finish(self, ctx: RunContext, sol: _Solution, active: list[int]) -> _Solution:
        """Force ``sol``'s thinking to its minimum, then make it answer."""
        try:
            await self._force(ctx, sol, active)
            if sol.answer_text is None and sol.ended != _FAILED:
                await self._answer(ctx, ctx.lm.continuation(), sol)
        finally:
            active[0] -= 1
        return sol

    async def _force(self, ctx: RunContext, sol: _Solution, active: list[int]) -> None:
        opts = self.options
        more = ctx.lm.continuation()
        while sol.answer_text is None and self._wants_more(sol):
            if sol.waits >= opts.max_waits:
                sol.ended = f"{_UNDER_MIN} after {sol.waits} waits (max_waits)"
                break
            thinking = _join(sol.thinking, opts.wait)
            prompt = ctx.prompt.continued(thinking)
            room = await self._room(ctx, prompt, max(1, active[0]))
            cap = opts.thinking_limit - sol.thinking_tokens
            if room is not None:
                cap = min(cap, room)
            if cap < 1:
                sol.ended = f"{_UNDER_MIN}: the budget could not pay for more"
                break
            params = self._thinking_params(ctx, 1, cap, self._seed(ctx, sol))
            try:
                completion = await more.generate(prompt, params, min_tokens=1)
            except BudgetExhausted:
                sol.ended = f"{_UNDER_MIN}: the budget could not pay for more"
                break
            except BackendError as exc:
                ctx.fail(exc)
                sol.ended = _FAILED
                return
            if not completion.samples:  # pragma: no cover - MeteredLM raises instead
                break
            sol.thinking, sol.waits = thinking, sol.waits + 1  # only now: a refused piece leaves no "Wait"
            self._take_thinking(sol, completion.samples[0])
            if completion.error is not None:
                ctx.fail(completion.error)
                sol.ended = _FAILED
                return

    def _wants_more(self, sol: _Solution) -> bool:
        """Whether the model ended thinking under the minimum (a cut or exhausted piece did not)."""
        return sol.ended == _BY_MODEL and sol.thinking_tokens < self.options.min_thinking_tokens

    def _take_thinking(self, sol: _Solution, sample: Sample) -> None:
        """Add one thinking piece to ``sol`` and say how thinking stands after it."""
        opts = self.options
        sol.add_tokens(sample)
        if sample.reasoning is not None and sample.text.strip():
            # the server split thinking from an answer: the model ended thinking, and answered
            total = len(sample.reasoning.encode()) + len(sample.text.encode())
            think = math.ceil(sample.output_tokens * len(sample.reasoning.encode()) / max(1, total))
            sol.thinking += sample.reasoning
            sol.thinking_tokens += think
            sol.ended = _BY_MODEL
            if sol.thinking_tokens >= opts.min_thinking_tokens:
                sol.answer_prefix, sol.answer_text, sol.finish = "", sample.text, sample.finish_reason
            return
        sol.thinking += (sample.reasoning or "") + sample.text
        sol.thinking_tokens += sample.output_tokens
        sol.finish = sample.finish_reason
        if sample.finish_reason == "stop":
            sol.ended = _BY_MODEL
        elif sol.thinking_tokens >= opts.thinking_limit:
            sol.ended = "was cut at the maximum"
        elif sample.finish_reason == "length":
            sol.ended = "was cut short by the budget"
        else:
            sol.ended = f"was cut short ({sample.finish_reason})"

    async def _answer(self, ctx: RunContext, more: MeteredLM, sol: _Solution) -> None:
        """The forced answer: one short call after the thinking, the marker and the cue."""
        opts = self.options
        tail = (opts.end_marker or "") + opts.answer_cue
        prompt = ctx.prompt.continued(_join(sol.thinking, tail) if tail else sol.thinking)
        params = SamplingParams(n=1, max_tokens=opts.answer_tokens, temperature=opts.sampling.temperature,
                                top_p=opts.sampling.top_p, stop=opts.sampling.stop, seed=self._seed(ctx, sol),
                                logprobs=opts.sampling.logprobs and ctx.lm.backend.capabilities.logprobs)
        try:
            completion = await more.generate(prompt, params, min_tokens=min(opts.answer_tokens, 4))
        except BudgetExhausted:
            sol.ended += "; no answer: the budget could not pay for it"
            return
        except BackendError as exc:
            ctx.fail(exc)
            sol.ended += "; no answer: the answer call failed"
            return
        if completion.samples:
            sample = completion.samples[0]
            sol.add_tokens(sample)
            sol.answer_prefix = tail
            sol.answer_text = (sample.reasoning or "") + sample.text
            sol.finish = sample.finish_reason
        if completion.error is not None:
            ctx.fail(completion.error)

    # -- helpers -------------------------------------------------------------------------------

    def _thinking_params(self, ctx: RunContext, n: int, cap: int, seed: int | None) -> SamplingParams:
        s = self.options.sampling
        marker = (self.options.end_marker,) if self.options.end_marker else ()
        return SamplingParams(n=n, max_tokens=cap, temperature=s.temperature, top_p=s.top_p,
                              stop=tuple(dict.fromkeys((*marker, *s.stop))), seed=seed,
                              logprobs=s.logprobs and ctx.lm.backend.capabilities.logprobs)

    def _seed(self, ctx: RunContext, sol: _Solution) -> int | None:
        return None if ctx.seed is None else ctx.seed + sol.index + _SEED_STRIDE * sol.pieces

    async def _room(self, ctx: RunContext, prompt: Prompt, share: int) -> int | None:
        """Thinking tokens the next piece may take so that the answer after it still fits."""
        backend = ctx.lm.backend
        tail = (self.options.end_marker or "") + self.options.answer_cue
        p = await backend.prompt_tokens(prompt)
        answer_in = (await backend.prompt_tokens(prompt.continued(tail)) - p if tail else 0) + _JOIN_SLACK
        return thinking_room(ctx.ledger.remaining(), p, answer_in, self.options.answer_tokens, backend.price, share)

    def _candidate(self, ctx: RunContext, sol: _Solution) -> Candidate:
        # read as every candidate of a run is read (RunContext.candidate): a copied placeholder is no answer
        if sol.answer_text is not None and sol.answer_prefix is not None:
            text = _join(sol.thinking, sol.answer_prefix) + sol.answer_text if sol.answer_prefix else \
                sol.thinking + sol.answer_text
            found = read_answer_for(sol.answer_prefix + sol.answer_text, ctx.placeholder)
            if found[0] is None:
                found = read_answer_for(text, ctx.placeholder)
        else:
            text, found = sol.thinking, read_answer_for(sol.thinking, ctx.placeholder)
        logprobs = tuple(sol.logprobs) if sol.logprobs else None
        sample = Sample(text, sol.finish, sol.tokens, logprobs, reasoning=sol.thinking)
        return Candidate.from_sample(sample, *found, ctx.lm.backend.model)

    def _note(self, sol: _Solution) -> str:
        opts = self.options
        return (f"solution {sol.index + 1}: {sol.thinking_tokens} thinking tokens (min {opts.min_thinking_tokens}, "
                f"max {opts.thinking_limit}), {sol.waits} wait(s), thinking {sol.ended}, "
                f"{sol.tokens} tokens in {sol.pieces} call(s)")


def thinking_room(rem: Remaining, prompt_tokens: int, answer_in: int, answer_out: int, price: Price,
                  share: int = 1) -> int | None:
    """The most thinking tokens one of ``share`` solutions in progress may draw in its next call
    (of a ``prompt_tokens`` prompt) so that the call and the answer call after it (the same prompt,
    the new thinking and ``answer_in`` tokens of marker and cue in; ``answer_out`` out) fit what
    remains. None: no token or dollar limit binds."""
    p, bounds = prompt_tokens, []
    if rem.output_tokens is not None:
        bounds.append(rem.output_tokens // share - answer_out)
    if rem.input_tokens is not None:
        bounds.append(rem.input_tokens // share - 2 * p - answer_in)
    if rem.total_tokens is not None:
        bounds.append((rem.total_tokens // share - 2 * p - answer_in - answer_out) // 2)
    if rem.usd is not None:
        pin, pout = price.per_input_token(), price.per_output_token()
        if pin + pout > 0:
            spare = rem.usd / share - (2 * p + answer_in) * pin - answer_out * pout
            bounds.append(math.floor(spare / (pin + pout)))
    return min(bounds) if bounds else None


def _join(text: str, more: str) -> str:
    """``more`` after ``text``, a space between them unless either side already has one."""
    if not text or text[-1].isspace() or more[:1].isspace():
        return text + more
    return f"{text} {more}"
