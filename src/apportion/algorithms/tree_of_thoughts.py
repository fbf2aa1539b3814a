"""Tree of Thoughts, breadth-first (Yao et al. 2023, "ToT-BFS"): a baseline for equal-budget comparisons.

A thought is one step (``algorithms/steps.py``). The search starts from the question alone: it
samples ``thoughts`` (k) first steps (one request of n=k), has every new state valued, and keeps
the best ``breadth`` (b) live states; at each later level every kept state asks for k next
thoughts (one request of n=k per state, all the level's requests in one round), every new state
is valued in one call of the process scorer, and the best b live states are kept again (identical
states once, as the paper's value cache does by valuing duplicates 0). The depth limit T is
``StepOptions.max_steps``. Thoughts are sampled i.i.d. (the paper's "sample" generator), not
proposed as one list. A state whose last thought holds a final answer (or that the model, a
length limit or the depth limit ended) is finished: it leaves the frontier as a candidate, never
to be expanded again. The answer: the best value among the finished states the model ended with
an answer (``vote``: the answer with the highest summed value), else among all with an answer
(``steps.choose``); the paper's answer is the best state of the last level, the same rule over
the states that reached an answer.

Self-evaluation. Unless a process scorer is given, states are valued by the policy model itself
with ToT's value prompt (``ThoughtValueScorer``): given the problem and the partial solution, it
answers sure, likely or impossible, ``samples`` times (one request of n=samples per new state,
all of a level's concurrently); the value is the mean of the paper's weights (20, 1, 0.001)
divided by 20, so in [0, 1]. A seeded run seeds each state's value request from its seed. Any
``ProcessScorer`` may be given instead (``process_scorer=``): the step judge
(``JudgeProcessScorer``), the Game of 24 verifier, a PRM.

Budget meaning: ``--budget N`` (generations) is the most states that finish, each one
generation, and the most alive at once (``algorithms/steps.py``: every state holds its generation
from the moment it is asked for; a pruned state gives it back). A level's b x k thoughts are cut
down, the lowest-valued states' first, where N leaves fewer; the search ends when N states have
finished. With no generation limit, ``width`` is N, by default k + (T - 1) x b x k: as many states
as a BFS of depth T can ever finish, so only tokens, dollars and time bind. Thoughts are continuations: charged in
tokens, dollars and seconds, never generations, and so are the value calls (as scoring: the
default scorer's requests are "scorer" calls of the policy model). Tokens, dollars and the
deadline bound every request; a level whose thought requests or valuation the budget refuses
ends the search, and the states still live end as "budget" candidates.
Round trips: one round of thought requests plus one round of valuation per level.
"""

from __future__ import annotations

import asyncio
import math
import re
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.steps import (
    ROOT,
    Path,
    SearchOptions,
    StepOptions,
    best_first,
    search_result,
    start_search,
    step_sampling,
)
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate, Result
from apportion.reward.process import AGGREGATIONS, PrefixOutcome, PrefixScoreCache, ProcessScorer, Steps, score_paths

# -- self-evaluation: ToT's value prompt -----------------------------------------------------------

VALUE_WORDS = ("sure", "likely", "impossible")
# The paper's value map (sure 20, likely 1, impossible 0.001), divided by 20: a process score must
# lie in [0, 1], and dividing keeps every comparison between states as the paper makes it.
VALUE_WEIGHTS = {"sure": 1.0, "likely": 1 / 20, "impossible": 0.001 / 20}
DEFAULT_VALUE_SYSTEM = "You evaluate partial solutions to problems."
DEFAULT_VALUE_TEMPLATE = (
    "Problem:\n{question}\n\nPartial solution (it may be complete):\n{state}\n\n"
    "Evaluate whether this partial solution is correct so far and can reach the right answer. "
    "Reply with one word: sure, likely or impossible."
)
_VALUE_WORD = re.compile(r"\b(sure|likely|impossible)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ThoughtValueOptions:
    """ToT's value prompt as a process scorer's settings."""

    samples: int = 3
    """Value replies per state (one request of n=samples), as the paper's three."""
    temperature: float = 0.7
    """The paper samples its values at the generator's temperature (0.7)."""
    max_tokens: int = 16
    system_prompt: str | None = DEFAULT_VALUE_SYSTEM
    template: str = DEFAULT_VALUE_TEMPLATE
    """Fields: ``{question}``, ``{state}`` (the steps so far, numbered)."""
    max_context_chars: int = 6000
    """The state is cut to its last this many characters."""
    max_concurrency: int = 16
    """Value requests in flight at once."""

    def __post_init__(self) -> None:
        if min(self.samples, self.max_tokens, self.max_context_chars, self.max_concurrency) < 1:
            raise ConfigError("value samples, max_tokens, max_context_chars and max_concurrency must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"value temperature must be in [0, 2], got {self.temperature}")
        if "{state}" not in self.template:
            raise ConfigError("a value template must contain {state}")


def read_value(samples: Sequence[Sample]) -> float | None:
    """A state's value from its value replies: each reply's last value word, weighted as the paper
    weighs it, summed over the replies and divided by their number (a reply with no value word
    counts 0, as the paper's parser gives it); None where no reply holds one."""
    words = [found[-1].lower() for s in samples if (found := _VALUE_WORD.findall(s.text))]
    if not words:
        return None
    return math.fsum(VALUE_WEIGHTS[w] for w in words) / len(samples)


class ThoughtValueScorer:
    """A ``ProcessScorer`` valuing each new state with ToT's value prompt (sure/likely/impossible).

    One request of n=samples per new state, all of a call's concurrently, through
    ``lm.scorer(backend)`` (default: the policy model): charged as scoring in tokens, dollars and
    time. States valued before come from the cache; an unreadable value is a definite None.
    With ``seed``, each state's request is seeded from it and the state's prompt (its replies are
    sampled, not greedy: without a seed a seeded run would not be reproducible)."""

    name = "tot-value"

    def __init__(self, backend: Backend | None = None, options: ThoughtValueOptions | None = None,
                 cache: PrefixScoreCache | None = None, *, seed: int | None = None) -> None:
        self.backend = backend
        self.options = options or ThoughtValueOptions()
        self.cache = cache if cache is not None else PrefixScoreCache()
        self.seed = seed

    async def score(self, lm: MeteredLM, question: str,
                    paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        judge = lm.scorer(self.backend)
        limit = asyncio.Semaphore(self.options.max_concurrency)

        async def one(state: Steps) -> float | None:
            async with limit:
                return await self._value(judge, question, state)

        async def score_new(states: list[Steps]) -> Mapping[Steps, PrefixOutcome]:
            outcomes = await asyncio.gather(*(one(s) for s in states), return_exceptions=True)
            for outcome in outcomes:  # cancellation is not a failure to record
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
            return dict(zip(states, outcomes))

        return await score_paths(self.cache, question, paths, score_new,
                                 scorer=f"{self.name} ({judge.backend.model})")

    def prompt(self, question: str, steps: Sequence[str]) -> Prompt:
        o = self.options
        state = "\n".join(f"Step {i}: {s.strip()}" for i, s in enumerate(steps, 1))[-o.max_context_chars:]
        return Prompt.chat(o.template.format(question=question, state=state), system=o.system_prompt)

    async def _value(self, judge: MeteredLM, question: str, steps: Steps) -> float | None:
        o = self.options
        prompt = self.prompt(question, steps)
        # one seed per state, so that states valued at once draw independently of each other
        seed = None if self.seed is None else self.seed + zlib.crc32(prompt.messages[-1].content.encode())
        params = SamplingParams(n=o.samples, max_tokens=o.max_tokens, temperature=o.temperature, logprobs=False,
                                seed=seed)
        completion = await judge.generate(prompt, params, min_tokens=1)
        return read_value(completion.samples)


# -- the search -----------------------------------------------------------------------------------

DEFAULT_BREADTH = 3


@dataclass(frozen=True, slots=True)
class TreeOfThoughtsOptions:
    sampling: SamplingOptions = field(default_factory=step_sampling)
    """``max_tokens`` bounds a whole path's output tokens; the system prompt asks for steps."""
    steps: StepOptions = field(default_factory=StepOptions)
    """What a thought is; ``max_steps`` is the depth limit T."""
    breadth: int = DEFAULT_BREADTH
    """b: the live states kept per level (the paper's Game of 24 setting is 5)."""
    thoughts: int = 3
    """k: the thoughts sampled from each kept state per level."""
    width: int | None = None
    """N where the budget sets no generation limit (default ``most_paths``, never binding); under
    one, at most N of it."""
    aggregation: str = "last"
    """How a state's step values make its value: "last", the newest state's, is ToT's."""
    vote: bool = False
    """Answer with the highest summed value over finished states instead of the best state's."""
    value: ThoughtValueOptions = field(default_factory=ThoughtValueOptions)
    """The self-evaluation's settings (unused when a process scorer is given)."""

    def __post_init__(self) -> None:
        if self.breadth < 1:
            raise ConfigError(f"breadth must be >= 1, got {self.breadth}")
        if self.thoughts < 1:
            raise ConfigError(f"thoughts must be >= 1, got {self.thoughts}")
        if self.width is not None and self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    @classmethod
    def from_search(cls, search: SearchOptions, breadth: int = DEFAULT_BREADTH) -> TreeOfThoughtsOptions:
        """ToT's options from a step-wise search's (the command line's): its sampling, steps,
        width, aggregation and vote, and its M (``beam_width``) as k."""
        return cls(sampling=search.sampling, steps=search.steps, breadth=breadth, thoughts=search.beam_width,
                   width=search.width, aggregation=search.aggregation, vote=search.vote)

    @property
    def most_paths(self) -> int:
        """The most states a BFS of these settings can finish: k at the first level, b x k at each later one."""
        return self.thoughts + (self.steps.max_steps - 1) * self.breadth * self.thoughts


class TreeOfThoughts(Algorithm):
    name = "tree-of-thoughts"

    def __init__(self, options: TreeOfThoughtsOptions | None = None, *, process_scorer: ProcessScorer | None = None,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or TreeOfThoughtsOptions()
        self.process_scorer = process_scorer

    def options_dict(self) -> dict[str, object]:
        scorer = self.process_scorer.name if self.process_scorer is not None else ThoughtValueScorer.name
        return {**super().options_dict(), "process_scorer": scorer}

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        # The default valuer is made per run: its cache is keyed by the question only, and another
        # run may bring another model (and another seed).
        scorer = self.process_scorer or ThoughtValueScorer(options=opts.value, seed=seed)
        width = opts.width if opts.width is not None else opts.most_paths
        ctx, search = await start_search(self, lm, prompt, budget, seed, opts.sampling, opts.steps, scorer,
                                         opts.aggregation, width)
        live: list[Path] = [ROOT]
        try:
            while live and search.room > 0 and not search.stopped:
                wants = [(state, opts.thoughts) for state in live]
                children = await search.step(wants)
                if not any(children):
                    live = [p for p, _ in wants if p.steps]
                    break
                level = [c for kids in children for c in kids if not c.finished]
                level += [p for (p, _), kids in zip(wants, children) if p.steps and not kids]  # refused: still live
                live = self._kept(level)
                search.prune(len(level) - len(live))
                yield search_result(ctx, search, prior, opts.vote, final=False)
            search.finish([p for p in live if p.steps])
        finally:
            search.close()
        yield search_result(ctx, search, prior, opts.vote, final=True)

    def _kept(self, level: Sequence[Path]) -> list[Path]:
        """The best ``breadth`` distinct live states of a level, best first (ties: the earlier)."""
        how = self.options.aggregation
        kept: list[Path] = []
        seen: set[tuple[str, ...]] = set()
        for i in sorted(range(len(level)), key=lambda i: best_first(level[i].score(how), i)):
            if len(kept) == self.options.breadth:
                break
            if level[i].steps not in seen:
                seen.add(level[i].steps)
                kept.append(level[i])
        return kept
