"""Multi-agent debate (Du et al. 2023): a baseline for equal-budget comparisons.

A agents answer the question (round 0: one request of n=A, the agents' answers its samples).
Then, for ``rounds`` rounds, each agent is shown the question, its own latest answer (as its
assistant turn) and the other agents' latest answers ("These are the solutions to the problem
from other agents: ... Using the solutions from other agents as additional advice, give an
updated answer"), and answers again: one request per agent, all of a round's together
(concurrently). The answer: the majority vote (``voting.tally``: extracted answers grouped by
equivalence) over every agent's latest answer. Ties go to the answer whose agents are jointly
more confident (summed geometric-mean token probability), then to the answer of the
lowest-numbered agent. Unlike Du et al.'s code, an agent's prompt holds its latest answer only,
not all its turns, so prompts grow with the agents, not with the rounds; and ``rounds`` counts
the revision rounds (their "2 rounds" is ``rounds=1`` here). Each round yields an interim
result: the vote over the answers so far (their generations are counted when the debate ends).

Budget meaning: ``--budget N`` (generations) is A = N agents (``agents``, where set, caps it),
each agent's final answer one generation: A generations are held from the start (``Ledger.hold``)
and each agent that answered settles its hold as one generation when the debate ends, so
``spent.generations`` is exactly the number of candidates, never more than N. With no generation
limit, A is ``agents`` (default 3). Every turn (round 0's and the revisions') is a continuation:
charged in tokens, dollars and seconds (``spent.continuations`` counts the turns), never
generations. Tokens, dollars and the deadline bound every request (round 0 clamped to fewer
samples is fewer agents); when the ledger refuses a turn, the debate ends after that round and the
answers so far are voted: an agent refused in a round keeps its answer of the round before, and so
does one whose revision ran into a token limit the budget lowered (an answer cut short by the
budget replaces no whole one). A budget of one generation is one agent's answer, with no revision
(there is no one to debate). Round trips: one per round, ``rounds`` + 1 at most;
``Result.search`` gives the rounds made (``steps``), the turns' requests and A (``width``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions
from apportion.algorithms.voting import tally
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger, Remaining
from apportion.budget.units import Budget, Spend
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Completion, Message, Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate, Result, SearchStats

DEFAULT_AGENTS = 3
DEFAULT_ADVICE_TEMPLATE = (
    "These are the solutions to the problem from other agents:\n\n{others}\n\n"
    "Using the solutions from other agents as additional advice, give an updated answer to the problem:\n{question}"
)
SOLUTION_TEMPLATE = "One agent solution: ```{solution}```"
# A seed per round (round r's agent i: seed + stride * r + i), so that no two turns share one.
_SEED_STRIDE = 7919
_ONE_GENERATION = Remaining(generations=1, input_tokens=None, output_tokens=None, total_tokens=None, usd=None,
                            seconds=None)


@dataclass(frozen=True, slots=True)
class DebateOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """Every turn's sampling: ``max_tokens`` bounds one turn; the system prompt is every agent's."""
    agents: int | None = None
    """A where the budget sets no generation limit (default 3); under one, at most A of it."""
    rounds: int = 2
    """Revision rounds after the first answers (Du et al.'s setting: 2)."""
    advice_template: str = DEFAULT_ADVICE_TEMPLATE
    """A revision turn's user message. Fields: ``{others}`` (the other agents' latest answers, each
    as ``SOLUTION_TEMPLATE``, blank lines between), ``{question}``."""

    def __post_init__(self) -> None:
        if self.agents is not None and self.agents < 2:
            raise ConfigError(f"a debate needs at least 2 agents, got agents={self.agents}")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}")
        if "{others}" not in self.advice_template:
            raise ConfigError("the debate's advice template must contain {others}")


class Debate(Algorithm):
    name = "debate"

    def __init__(self, options: DebateOptions | None = None, *, equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or DebateOptions()

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx = self.context(lm, prompt, budget, seed, opts.sampling.system_prompt)
        await ctx.apply_prompt_mode(opts.sampling.prompt_mode)
        debate = _Debate(ctx, opts)
        try:
            debate.hold(self._agents(ctx))
            if debate.holds:
                await debate.first_round()
                if debate.answers:
                    yield debate.result(prior, final=False)
                if len(debate.answers) == 1:
                    ctx.notes.append("the budget allowed one agent: one answer, no debate")
            while debate.rounds <= opts.rounds and len(debate.answers) > 1 and not debate.stopped:
                await debate.revise()
                yield debate.result(prior, final=False)
            debate.settle()
        finally:
            debate.close()
        yield debate.result(prior, final=True)

    def _agents(self, ctx: RunContext) -> int:
        """A: the generations left (capped by ``agents`` where set), else ``agents``, else 3."""
        left = ctx.ledger.remaining().generations
        if left is None:
            return self.options.agents or DEFAULT_AGENTS
        return max(0, left if self.options.agents is None else min(self.options.agents, left))


class _Debate:
    """One debate's state: the agents' generation holds, their latest answers, the rounds made."""

    def __init__(self, ctx: RunContext, options: DebateOptions) -> None:
        self.ctx = ctx
        self.options = options
        self.turns: MeteredLM = ctx.lm.continuation()
        self.holds: list[int] = []
        self.answers: list[Sample] = []
        """Agent i's latest answer."""
        self.rounds = 0
        self.refused = False
        """The budget refused a turn: the debate ends after this round."""
        self._counted = 0
        self._trace_start = len(ctx.ledger.trace)

    @property
    def stopped(self) -> bool:
        return self.refused or self.ctx.error is not None or self.ctx.stop_reason == "deadline"

    def hold(self, agents: int) -> None:
        for _ in range(agents):
            held = self.ctx.ledger.hold(_ONE_GENERATION)
            if held is None:  # a parent ledger has fewer generations than this one says
                break
            self.holds.append(held)
        if not self.holds:
            self.ctx.ledger.exhausted_reason = self.ctx.ledger.exhausted_reason or "generations: none left"

    async def first_round(self) -> None:
        """Round 0: one request of n=A; where the budget gives fewer samples, fewer agents."""
        completion = await self._turn(self.ctx.prompt, len(self.holds), 0)
        self.rounds = 1
        if completion is not None:
            self.answers = list(completion.samples)
        self._release(len(self.holds) - len(self.answers))

    async def revise(self) -> None:
        """One revision round: every agent's turn at once; a refused agent keeps its last answer."""
        prompts = [self._revision(i) for i in range(len(self.answers))]
        replies = await asyncio.gather(*(self._turn(p, 1, i) for i, p in enumerate(prompts)))
        self.rounds += 1
        for i, reply in enumerate(replies):
            if reply is not None and reply.samples and not _cut_by_budget(reply):
                self.answers[i] = reply.samples[0]

    def settle(self) -> None:
        """Count every agent's answer as one generation (its hold settled)."""
        while self._counted < len(self.answers):
            self.ctx.ledger.settle_hold(self.holds.pop(), Spend(generations=1))
            self._counted += 1

    def close(self) -> None:
        """Give back every hold not settled (a debate cut short by cancellation or an error)."""
        self._release(len(self.holds))
        if self.ctx.ledger.remaining().generations == 0:
            self.ctx.ledger.exhausted_reason = self.ctx.ledger.exhausted_reason or "generations: none left"

    def result(self, prior: Sequence[Candidate], *, final: bool) -> Result:
        ctx = self.ctx
        t = tally([*prior, *(ctx.candidate(s) for s in self.answers)], ctx.equivalence)
        response = t.candidates[t.winner_index].text if t.winner_index is not None else None
        trace = ctx.ledger.trace[self._trace_start:]
        stats = SearchStats(steps=self.rounds, round_trips=self.rounds,
                            requests=sum(1 for r in trace if r.kind == "continuation"), scoring_calls=0,
                            chosen=t.winner_index, width=self._counted + len(self.holds))
        return ctx.result(answer=t.winner, response=response, candidates=t.candidates, distribution=t.distribution,
                          final=final, search=stats)

    # -- internals -----------------------------------------------------------------------------

    def _revision(self, agent: int) -> Prompt:
        """Agent ``agent``'s prompt for a revision: the question, its latest answer, the others'."""
        ctx, own = self.ctx, self.answers[agent].text
        others = "\n\n".join(SOLUTION_TEMPLATE.format(solution=s.text.strip())
                             for j, s in enumerate(self.answers) if j != agent)
        advice = self.options.advice_template.format(others=others, question=ctx.question)
        base = ctx.prompt
        if base.is_chat:
            return Prompt((*base.messages, Message("assistant", base.assistant_prefix + own), Message("user", advice)))
        return Prompt.raw(f"{base.text}{base.assistant_prefix}{own}\n\n{advice}\n\n")

    async def _turn(self, prompt: Prompt, n: int, offset: int) -> Completion | None:
        """One request of ``n`` turns; None when the budget refused it or it failed."""
        ctx, s = self.ctx, self.options.sampling
        params = SamplingParams(
            n=n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, stop=s.stop,
            seed=None if ctx.seed is None else ctx.seed + _SEED_STRIDE * self.rounds + offset,
            logprobs=s.logprobs and ctx.lm.backend.capabilities.logprobs)
        completion, refused = await ctx.request(self.turns, prompt, params, s.min_tokens)
        self.refused = self.refused or refused
        return completion

    def _release(self, count: int) -> None:
        for _ in range(count):
            self.ctx.ledger.release_hold(self.holds.pop())


def _cut_by_budget(completion: Completion) -> bool:
    """Whether a turn ran into a token limit the budget lowered (``MeteredLM`` notes the clamp):
    an answer cut short by the budget, not by the method, replaces no whole answer."""
    clamped = any(note.startswith("budget clamped") for note in completion.notes)
    return clamped and completion.samples[0].finish_reason == "length"
