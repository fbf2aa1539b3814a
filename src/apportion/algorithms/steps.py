"""Step-wise search: a solution as a sequence of steps, and the state every step-wise search shares.

Steps. A path is the steps written so far. Its next step is asked for by continuing the
assistant turn after them (``Prompt.continued``): after ``delimiter`` (default a blank line) with
the delimiter as a stop string, or, with ``every_tokens=k``, k tokens at a time. A path ends
(``Path.ended``) when

- "answer": a step holds a final answer, read by ``answers/extract`` ("The answer is X",
  ``\\boxed{X}``, "#### X", "Answer: X"; ``StepOptions.final_answer`` picks which; a bare last
  number never ends a path);
- "eos": the model ended the reply (with a delimiter: an empty step; every k tokens: a step that
  stopped before its k tokens);
- "length": a delimiter step ran into its token limit (``max_step_tokens``, or less where the
  budget clamped the request), or the path into ``SamplingOptions.max_tokens`` in all;
- "max-steps": it has ``max_steps`` steps;
- "deadline": the deadline cut its step;
- "budget" (or "failed"): the search ended while it was live (the budget refused a request, or a
  failure ended the run).

Backends strip a stop string from the text and report "stop" for it as for the end of the
reply, so a non-empty step that stopped is read as a step boundary; a model that had really ended
there writes an empty next step (one short request), or the path runs into ``max_steps``.

Requests. ``StepSearch.step`` asks for the next step of every live path together: one round of
concurrent continuation requests per search step, and paths with the same steps (several
children of one path, or duplicates) share one request of ``n`` = the children wanted, never k
requests. The children are scored by the process scorer in one call per search step (prefixes
scored before come from its cache).

Budget. A generation is one finished path: every step request is a continuation (charged in
tokens, dollars and seconds, counted in ``spent.continuations``), and a path counts as one
generation when it ends and is kept as a candidate. To make that exact under a generation
limit, every path that may end holds one generation of the ledger (``Ledger.hold``) from the
moment it is asked for: a request for k children first holds the k - 1 generations the parent's
own hold does not cover, and is cut down when the ledger (or the search's width N) has fewer. A
path that ends settles its hold as one generation; a pruned path gives its hold back. So at most
N paths are alive or finished at once, finished paths never exceed the generation budget, and a
search's ``spent.generations`` is exactly its number of candidates. Tokens, dollars and the
deadline bound every request and every scoring call through the ledger as usual.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from apportion.algorithms.base import DEFAULT_BATCH, Algorithm, RunContext, SamplingOptions
from apportion.algorithms.voting import score_tally, tally
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import METHODS, extract_answer, read_answer_for
from apportion.budget.ledger import Ledger, Remaining
from apportion.budget.units import Budget, Spend
from apportion.errors import (
    BackendError,
    BudgetExhausted,
    ConfigError,
    ProcessScoringFailed,
    ScoringFailed,
)
from apportion.lm.base import Backend, Completion, Prompt, Sample, SamplingParams
from apportion.result import Candidate, Result, SearchStats
from apportion.reward.process import AGGREGATIONS, ProcessScorer, aggregate

STEP_SYSTEM_PROMPT = "Solve the problem in short steps, separated by a blank line. End with 'The answer is N'."
"""The system prompt of a step-wise search unless one is chosen: steps must be asked for to be had
(the shared default asks for brevity, and a small model then writes one paragraph)."""
FINAL_ANSWER_METHODS = ("boxed", "hashes", "answer_is", "answer_colon")
"""The answer markers that end a path (``answers.extract.METHODS`` less the bare last number)."""
ENDINGS = ("answer", "eos", "length", "max-steps", "deadline", "budget", "failed")
_BY_MODEL = ("answer", "eos")
# A seed per round of step requests (round r's samples: seed + stride * r + their offset).
_SEED_STRIDE = 7919
_ONE_GENERATION = Remaining(generations=1, input_tokens=None, output_tokens=None, total_tokens=None, usd=None,
                            seconds=None)


@dataclass(frozen=True, slots=True)
class StepOptions:
    """How a solution is cut into steps, and when a path ends."""

    delimiter: str = "\n\n"
    """What ends a step (a stop string); unused with ``every_tokens``."""
    every_tokens: int | None = None
    """Cut a step every this many tokens instead of at the delimiter."""
    final_answer: tuple[str, ...] = FINAL_ANSWER_METHODS
    """The answer markers (``answers.extract`` methods) whose presence in a step ends the path."""
    max_steps: int = 16
    max_step_tokens: int = 256
    """The most tokens one step may take (a delimiter step that reaches it ends its path)."""

    def __post_init__(self) -> None:
        if self.every_tokens is None and not self.delimiter:
            raise ConfigError("a step needs a delimiter or every_tokens")
        if self.every_tokens is not None and self.every_tokens < 1:
            raise ConfigError(f"every_tokens must be >= 1, got {self.every_tokens}")
        unknown = [m for m in self.final_answer if m not in METHODS]
        if unknown:
            raise ConfigError(f"final_answer methods must be among {METHODS}, got {unknown}")
        if self.max_steps < 1 or self.max_step_tokens < 1:
            raise ConfigError("max_steps and max_step_tokens must be >= 1")

    @property
    def step_tokens(self) -> int:
        return self.every_tokens if self.every_tokens is not None else self.max_step_tokens

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.every_tokens is not None else (self.delimiter,)

    def text(self, steps: Sequence[str]) -> str:
        """The solution the steps make."""
        return "".join(steps) if self.every_tokens is not None else self.delimiter.join(steps)

    def prefix(self, steps: Sequence[str]) -> str:
        """The assistant text the next step continues (empty before the first step)."""
        if self.every_tokens is not None or not steps:
            return "".join(steps)
        return self.delimiter.join(steps) + self.delimiter

    def has_final_answer(self, step: str) -> bool:
        found = extract_answer(step)
        return found is not None and found.method in self.final_answer


@dataclass(frozen=True, slots=True)
class Path:
    """A partial or finished solution: its steps, the process scores of its prefixes
    (``step_scores[k]`` rates ``steps[:k+1]``), why it ended (None: live, see ``ENDINGS``), its
    output tokens over all its steps, and its normalised answer once it ended."""

    steps: tuple[str, ...] = ()
    step_scores: tuple[float | None, ...] = ()
    ended: str | None = None
    tokens: int = 0
    answer: str | None = None
    logprobs: tuple[float, ...] | None = field(default=(), repr=False)
    """The sampled tokens' log-probabilities over all steps; None where a step had none."""

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def by_model(self) -> bool:
        """Whether the model ended it (an answer, or the end of its reply)."""
        return self.ended in _BY_MODEL

    @property
    def finish_reason(self) -> str:
        """As a sample's: "stop" where the model ended it, "deadline", else "length"."""
        if self.by_model:
            return "stop"
        return "deadline" if self.ended == "deadline" else "length"

    def score(self, how: str = "last") -> float | None:
        return aggregate(self.step_scores, how)


ROOT = Path()
"""The empty path every search starts from (it holds no generation)."""


def step_sampling() -> SamplingOptions:
    """The sampling options a step-wise search starts from: the shared ones, asking for steps."""
    return SamplingOptions(system_prompt=STEP_SYSTEM_PROMPT)


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal whole shares, larger first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def best_first(score: float | None, index: int) -> tuple[bool, float, int]:
    """A sort key, best first: scored before unscored, higher before lower, earlier before later."""
    return score is None, -(score or 0.0), index


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """A step-wise search's settings (beam search and DVTS read the same ones)."""

    sampling: SamplingOptions = field(default_factory=step_sampling)
    """``max_tokens`` bounds a whole path's output tokens; temperature, top_p and stop as for a sample;
    the system prompt asks for steps separated by blank lines (``STEP_SYSTEM_PROMPT``)."""
    steps: StepOptions = field(default_factory=StepOptions)
    beam_width: int = 4
    """M: the next steps asked of each kept path (beam search), or the candidate next steps each
    subtree gets per search step (DVTS, with N // M subtrees)."""
    width: int | None = None
    """N where the budget sets no generation limit (default 8); under one, at most N of it."""
    aggregation: str = "last"
    """How a path's step scores make its score (``reward.process.AGGREGATIONS``)."""
    vote: bool = False
    """Answer with the highest summed score over paths instead of the best path's."""

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ConfigError(f"beam_width must be >= 1, got {self.beam_width}")
        if self.width is not None and self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


class SearchAlgorithm(Algorithm):
    """What beam search and DVTS share: their options and the process scorer they are built with."""

    def __init__(self, options: SearchOptions | None = None, *, process_scorer: ProcessScorer | None = None,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or SearchOptions()
        self.process_scorer = process_scorer

    def options_dict(self) -> dict[str, object]:
        scorer = self.process_scorer.name if self.process_scorer is not None else None
        return {**super().options_dict(), "process_scorer": scorer}


def search_width(ctx: RunContext, width: int | None) -> int:
    """N: the generations left (capped by ``width`` where given), else ``width``, else 8."""
    left = ctx.ledger.remaining().generations
    if left is None:
        return width if width is not None else DEFAULT_BATCH
    return max(0, left if width is None else min(width, left))


class StepSearch:
    """One step-wise search's state: its requests, scoring, generation holds and candidates.

    The caller keeps the live paths; every path ``step`` returns is live or finished, and the
    caller must ``prune`` each live one it drops (giving its hold back) and ``finish`` each it
    ends (counting it), so that the holds always match the live paths."""

    def __init__(self, ctx: RunContext, sampling: SamplingOptions, steps: StepOptions,
                 scorer: ProcessScorer, aggregation: str, width: int) -> None:
        self.ctx = ctx
        self.sampling = sampling
        self.steps = steps
        self.scorer = scorer
        self.aggregation = aggregation
        self.width = width
        self.finished: list[Path] = []
        self.rounds = 0
        self.scoring_rounds = 0
        self.refused = False
        """The budget refused a step request or the scoring: the search ends after this step."""
        self._more = ctx.lm.continuation()
        self._holds: list[int] = []
        self._counted = 0
        self._trace_start = len(ctx.ledger.trace)

    # -- the state -----------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """How many more paths may still end (N less the paths finished)."""
        return self.width - self._counted

    @property
    def stopped(self) -> bool:
        """Whether the search must end: the budget refused, a failure, or the deadline came."""
        return self.refused or self.ctx.error is not None or self.ctx.stop_reason == "deadline"

    def live_reason(self) -> str:
        """What ends the paths still live when the search stops."""
        if self.ctx.stop_reason == "deadline":
            return "deadline"
        return "failed" if self.ctx.error is not None and not self.refused else "budget"

    # -- one search step -----------------------------------------------------------------------

    async def step(self, wants: Sequence[tuple[Path, int]],
                   caps: Sequence[int | None] | None = None) -> list[list[Path]]:
        """For each (path, k): up to k children, each the path and its next step, scored. All
        requests go out together; one request per distinct prefix. Finished children are counted
        and kept (``finished``). A path that got children is replaced by them (its hold passed
        on); one that got none (refused) is still live. ``caps`` (one per want, None: none) bound
        each want's children's step tokens below the step and path limits (a token share)."""
        children = await self.expand(wants, caps)
        flat = [c for kids in children for c in kids]
        scored = iter(await self.score(flat))
        out = [[next(scored) for _ in kids] for kids in children]
        self.finish([c for kids in out for c in kids if c.finished])
        return out

    async def expand(self, wants: Sequence[tuple[Path, int]],
                     caps: Sequence[int | None] | None = None) -> list[list[Path]]:
        """The unscored children of each (path, k); see ``step``."""
        bounds = caps if caps is not None else [None] * len(wants)
        limits = [self._tokens_left(p) if cap is None else min(self._tokens_left(p), cap)
                  for (p, _), cap in zip(wants, bounds)]
        ks = [k if k > 0 and limit > 0 else 0 for (_, k), limit in zip(wants, limits)]
        holding = sum(1 for (p, _), k in zip(wants, ks) if p.steps and k)
        extra = sum(ks) - holding
        got = self._take(max(0, extra))
        deficit = extra - got
        for i in reversed(range(len(ks))):  # fewer children where fewer generations could be held
            if deficit <= 0:
                break
            cut = min(deficit, ks[i] - (1 if wants[i][0].steps and ks[i] else 0))
            ks[i] -= cut
            deficit -= cut
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, ((path, _), k) in enumerate(zip(wants, ks)):
            if k:
                groups.setdefault(path.steps, []).append(i)
        children: list[list[Path]] = [[] for _ in wants]
        if groups:
            offsets = [0]
            for members in groups.values():
                offsets.append(offsets[-1] + sum(ks[i] for i in members))
            replies = await asyncio.gather(*(self._request([wants[i][0] for i in members], sum(ks[i] for i in members),
                                                           offset, min(limits[i] for i in members))
                                             for members, offset in zip(groups.values(), offsets)))
            self.rounds += 1
            for members, reply in zip(groups.values(), replies):
                if isinstance(reply, Completion):
                    self._share(reply, members, ks, wants, children)
        consumed = sum(1 for (p, _), kids in zip(wants, children) if p.steps and kids)
        made = sum(len(kids) for kids in children)
        self._release(got + consumed - made)  # the holds no child took
        return children

    async def score(self, paths: Sequence[Path]) -> list[Path]:
        """``paths`` with their step scores, all in one call to the process scorer (paths with
        no steps have none). Budget refusals end the search; failures end the run (``ctx.fail``)."""
        todo = [i for i, p in enumerate(paths) if p.steps]
        if not todo:
            return list(paths)
        before = self._scoring_calls()
        got: list[list[float | None]] | None
        try:
            got = await self.scorer.score(self.ctx.lm, self.ctx.question, [paths[i].steps for i in todo])
        except ProcessScoringFailed as exc:
            got = exc.step_scores
            self.refused = self.refused or exc.exhausted
            if not exc.exhausted:
                self.ctx.fail(exc)
        except BudgetExhausted:
            got, self.refused = None, True
        except (ScoringFailed, BackendError) as exc:
            got = None
            self.ctx.fail(exc)
        if self._scoring_calls() > before:
            self.scoring_rounds += 1
        out = list(paths)
        for j, i in enumerate(todo):
            scores = got[j] if got is not None and j < len(got) else []
            n = len(paths[i].steps)
            out[i] = replace(paths[i], step_scores=tuple(scores) if len(scores) == n else (None,) * n)
        return out

    def finish(self, paths: Sequence[Path], reason: str | None = None) -> None:
        """End ``paths`` (live ones with ``reason``, by default ``live_reason()``) and keep them
        as candidates: each settles its hold as one generation."""
        for path in paths:
            if not path.finished:
                ended = reason or self.live_reason()
                path = replace(path, ended=ended, answer=self._answer(path.steps))
            held = self._holds.pop()
            self.ctx.ledger.settle_hold(held, Spend(generations=1))
            self._counted += 1
            self.finished.append(path)

    def prune(self, count: int) -> None:
        """Drop ``count`` live paths: their holds go back to the ledger."""
        self._release(count)

    def close(self) -> None:
        """Give back every hold still taken (a search cut short by cancellation or an error)."""
        self._release(len(self._holds))
        if self.ctx.ledger.remaining().generations == 0:
            self.ctx.ledger.exhausted_reason = self.ctx.ledger.exhausted_reason or "generations: none left"

    # -- results -------------------------------------------------------------------------------

    def candidate(self, path: Path) -> Candidate:
        text = self.steps.text(path.steps)
        sample = Sample(text, path.finish_reason, path.tokens, path.logprobs or None)
        found = read_answer_for(text, self.ctx.placeholder)
        made = Candidate.from_sample(sample, *found, self.ctx.lm.backend.model)
        return replace(made, score=path.score(self.aggregation), steps=path.steps, step_scores=path.step_scores)

    def stats(self, chosen: int | None) -> SearchStats:
        trace = self.ctx.ledger.trace[self._trace_start:]
        return SearchStats(steps=self.rounds, round_trips=self.rounds + self.scoring_rounds,
                           requests=sum(1 for r in trace if r.kind == "continuation"),
                           scoring_calls=sum(1 for r in trace if r.kind == "scorer"), chosen=chosen,
                           width=self.width)

    # -- internals -----------------------------------------------------------------------------

    def _tokens_left(self, path: Path) -> int:
        return min(self.steps.step_tokens, self.sampling.max_tokens - path.tokens)

    async def _request(self, parents: Sequence[Path], n: int, offset: int, max_tokens: int) -> Completion | None:
        """One request for ``n`` next steps of at most ``max_tokens`` after the parents' shared
        steps; None when refused or failed."""
        ctx, s = self.ctx, self.sampling
        params = SamplingParams(
            n=n, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
            stop=tuple(dict.fromkeys((*self.steps.stops, *s.stop))),
            seed=None if ctx.seed is None else ctx.seed + _SEED_STRIDE * self.rounds + offset,
            logprobs=s.logprobs and ctx.lm.backend.capabilities.logprobs)
        prompt = ctx.prompt.continued(self.steps.prefix(parents[0].steps))
        completion, refused = await ctx.request(self._more, prompt, params, min(s.min_tokens, max_tokens))
        self.refused = self.refused or refused
        return completion

    def _share(self, completion: Completion, members: list[int], ks: list[int],
               wants: Sequence[tuple[Path, int]], children: list[list[Path]]) -> None:
        """Deal one request's samples out to the paths that share it, in turn (a request the
        budget cut to fewer samples leaves each of them some)."""
        samples = list(completion.samples)
        while samples:
            for i in members:
                if samples and len(children[i]) < ks[i]:
                    children[i].append(self._child(wants[i][0], samples.pop(0)))

    def _child(self, parent: Path, sample: Sample) -> Path:
        opts, text = self.steps, sample.text
        steps, ended = parent.steps, None
        if sample.finish_reason == "deadline":
            steps, ended = ((*steps, text) if text.strip() else steps), "deadline"
        elif opts.every_tokens is None:
            if not text.strip():
                ended = "eos"
            else:
                steps += (text,)
                if opts.has_final_answer(text):
                    ended = "answer"
                elif sample.finish_reason != "stop":
                    ended = "length"
        else:
            if text:
                steps += (text,)
            if opts.has_final_answer(text):
                ended = "answer"
            elif sample.finish_reason == "stop":
                ended = "eos"
        tokens = parent.tokens + sample.output_tokens
        if ended is None and len(steps) >= opts.max_steps:
            ended = "max-steps"
        if ended is None and tokens >= self.sampling.max_tokens:
            ended = "length"
        logprobs = None if parent.logprobs is None or sample.logprobs is None else parent.logprobs + sample.logprobs
        return Path(steps, parent.step_scores[: len(steps)], ended, tokens,
                    self._answer(steps) if ended else None, logprobs)

    def _answer(self, steps: Sequence[str]) -> str | None:
        return read_answer_for(self.steps.text(steps), self.ctx.placeholder)[0]

    def _take(self, k: int) -> int:
        """Hold up to ``k`` more generations (within N and the ledger); how many were held."""
        allowed = max(0, min(k, self.width - self._counted - len(self._holds)))
        got = 0
        while got < allowed:
            held = self.ctx.ledger.hold(_ONE_GENERATION)
            if held is None:
                break
            self._holds.append(held)
            got += 1
        return got

    def _release(self, count: int) -> None:
        for _ in range(count):
            self.ctx.ledger.release_hold(self._holds.pop())

    def _scoring_calls(self) -> int:
        return sum(1 for r in self.ctx.ledger.trace[self._trace_start:] if r.kind == "scorer")


@dataclass(frozen=True, slots=True)
class Choice:
    answer: str | None
    index: int | None
    distribution: dict[str, float]
    candidates: tuple[Candidate, ...]
    note: str | None = None


def choose(candidates: Sequence[Candidate], complete: Sequence[bool], equivalence: Equivalence, *,
           vote: bool) -> Choice:
    """The answer of a search: among the paths the model ended with an answer (``complete``),
    the best aggregated score (``vote``: the answer with the highest summed score); where none
    did, among every path with an answer. ``candidates`` come back with their votes filled in."""
    voted = tally(candidates, equivalence).candidates
    pool = [i for i, c in enumerate(candidates) if complete[i] and c.answer is not None]
    note = None
    if not pool:
        pool = [i for i, c in enumerate(candidates) if c.answer is not None]
        if pool:
            note = "no path ended with an answer: the answer is read from paths the search cut short"
    if not pool:
        return Choice(None, None, {}, voted, note)
    t, fell_back = score_tally([candidates[i] for i in pool], equivalence, weighted=vote)
    if fell_back:
        note = "no path with an answer could be scored: fell back to majority vote"
    index = pool[t.winner_index] if t.winner_index is not None else None
    return Choice(t.winner, index, t.distribution, voted, note)


async def start_search(algorithm: Algorithm, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger,
                       seed: int | None, sampling: SamplingOptions, steps: StepOptions,
                       scorer: ProcessScorer | None, aggregation: str,
                       width: int | None) -> tuple[RunContext, StepSearch]:
    """The checks and the context every step-wise search starts with."""
    if scorer is None:
        raise ConfigError(f"{algorithm.name} needs a process scorer (--process-scorer)")
    if not lm.capabilities.continuation:
        raise ConfigError(f"{algorithm.name} continues paths step by step, which {lm.name} ({lm.model}) cannot do")
    ctx = algorithm.context(lm, prompt, budget, seed, sampling.system_prompt)
    await ctx.apply_prompt_mode(sampling.prompt_mode)
    n = search_width(ctx, width)
    if n < 1:
        ctx.ledger.exhausted_reason = ctx.ledger.exhausted_reason or "generations: none left"
    return ctx, StepSearch(ctx, sampling, steps, scorer, aggregation, n)


def search_result(ctx: RunContext, search: StepSearch, prior: Sequence[Candidate], vote: bool, *,
                  final: bool) -> Result:
    """The result so far: the finished paths (after any ``prior`` candidates), the chosen answer."""
    candidates = [*prior, *(search.candidate(p) for p in search.finished)]
    complete = [True] * len(prior) + [p.by_model for p in search.finished]
    choice = choose(candidates, complete, ctx.equivalence, vote=vote)
    if final and choice.note and choice.note not in ctx.notes:
        ctx.notes.append(choice.note)
    response = choice.candidates[choice.index].text if choice.index is not None else None
    return ctx.result(answer=choice.answer, response=response, candidates=choice.candidates,
                      distribution=choice.distribution, final=final, search=search.stats(choice.index))
