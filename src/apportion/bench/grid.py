"""The benchmark grid: algorithms x budgets over a dataset, one summary row per cell.

Sample-based algorithms (self-consistency, best-of-N with a log-prob or bank scorer) are
evaluated from a bank: K = max(budgets) samples per question are drawn once, then every budget
up to K is replayed over many random orders (``bench.replay``). Anything else runs live, once
per budget, through the same code path as ``apportion run``. Rows of both kinds share one shape
(``Row``), so tables, plots and peers line up.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.prompting import apply_prompt_mode, replayable_prompt_mode
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.stopping import StopRule
from apportion.answers.equivalence import Equivalence
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.bench.replay import REPLAYABLE, replay
from apportion.bench.stats import mean_interval
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price
from apportion.errors import ApportionError, BackendError, ConfigError, RunFailed
from apportion.lm.base import Backend, Prompt, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.reward import SCORERS

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage's count of finished questions."""

# Scorers replay can compute from a bank's samples (the rest need model calls: live).
_REPLAY_SCORERS = {"self-certainty": "self-certainty", "logprob": "self-certainty", "bank": "bank"}


@dataclass(frozen=True, slots=True)
class GridOptions:
    algorithms: tuple[str, ...]
    budgets: tuple[int, ...]
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    scorer: str = "self-certainty"
    live: bool = False
    """Run every cell live, even those a bank could replay."""
    orders: int = 100
    seed: int = 0
    concurrency: int = 1
    stops: tuple[StopRule, ...] = ()
    """Stopping rules replayed beside each replayed algorithm at the bank's full size."""

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise ConfigError("give at least one algorithm")
        for name in self.algorithms:
            make_algorithm(name)  # a clear error for an unknown name, before any sampling
        if not self.budgets or min(self.budgets) < 1:
            raise ConfigError(f"budgets must be whole numbers >= 1, got {list(self.budgets)}")
        if len(set(self.budgets)) != len(self.budgets):
            raise ConfigError(f"budgets repeat: {list(self.budgets)}")
        if self.scorer not in SCORERS and self.scorer != "bank":
            raise ConfigError(f"unknown scorer {self.scorer!r}; known: {', '.join(sorted({*SCORERS, 'bank'}))}")
        if self.orders < 1:
            raise ConfigError(f"orders must be >= 1, got {self.orders}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        why = replayable_prompt_mode(self.sampling.prompt_mode)
        if why is not None and any(self.replayed(a) for a in self.algorithms):
            raise ConfigError(f"these cells would replay a bank, and {why}")

    def replayed(self, algorithm: str) -> bool:
        name = canonical(algorithm)
        if self.live or name not in REPLAYABLE:
            return False
        return name == "self-consistency" or self.scorer in _REPLAY_SCORERS

    @property
    def bank_size(self) -> int:
        return max(self.budgets)


def canonical(algorithm: str) -> str:
    return make_algorithm(algorithm).name


@dataclass(frozen=True, slots=True)
class Row:
    """One cell of the grid (the summary.json row format that ``report`` reads)."""

    system: str
    algorithm: str
    scorer: str | None
    budget: int
    mode: str
    questions: int
    accuracy: float
    ci_low: float
    ci_high: float
    accuracy_std: float | None
    orders: int | None
    input_tokens: float
    output_tokens: float
    tokens: float
    usd: float
    wall_seconds: float
    wall_estimated: bool
    errors: int = 0
    by_level: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    generations: float | None = None
    """Mean generations per question, where it differs from the budget (a stopping rule's row)."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["notes"] = list(self.notes)
        return out

    @property
    def label(self) -> str:
        return f"{self.system} {self.algorithm}" + (f" ({self.scorer})" if self.scorer else "")


@dataclass(frozen=True, slots=True)
class QuestionOutcome:
    """What one question got in one cell: a replay rate, or a live answer."""

    problem: Problem
    right: float
    """1/0 live; the fraction of orders answered right in replay."""
    input_tokens: float
    output_tokens: float
    usd: float
    answer: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_row(system: str, algorithm: str, scorer: str | None, budget: int, mode: str,
             outcomes: Sequence[QuestionOutcome], wall: float, wall_estimated: bool,
             accuracy_std: float | None = None, orders: int | None = None,
             notes: Sequence[str] = (), generations: float | None = None) -> Row:
    """A summary row from per-question outcomes; errors count as wrong (the question was asked)."""
    rates = [o.right for o in outcomes]
    low, high = mean_interval(rates)
    levels: dict[str, list[float]] = {}
    for o in outcomes:
        if o.problem.level is not None:
            levels.setdefault(o.problem.level, []).append(o.right)
    mean = statistics.fmean if outcomes else (lambda _: 0.0)
    input_tokens = mean([o.input_tokens for o in outcomes])
    output_tokens = mean([o.output_tokens for o in outcomes])
    return Row(system, algorithm, scorer, budget, mode, len(outcomes), mean(rates), low, high, accuracy_std,
               orders, input_tokens, output_tokens, input_tokens + output_tokens,
               mean([o.usd for o in outcomes]), wall, wall_estimated,
               sum(1 for o in outcomes if o.error), _levels(levels), tuple(notes), generations)


def _levels(levels: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    def order(level: str) -> tuple[int, float | str]:
        try:
            return (0, float(level))
        except ValueError:
            return (1, level)

    return {lv: {"accuracy": statistics.fmean(v), "questions": len(v)} for lv, v in
            sorted(levels.items(), key=lambda kv: order(kv[0]))}


# --- drawing a bank -------------------------------------------------------------------------


def bank_prompt(problem: Problem, sampling: SamplingOptions) -> Prompt:
    """The prompt a live run is given for this question (its algorithm rewords it for a prompt mode)."""
    return Prompt.chat(problem.question, system=sampling.system_prompt)


async def sent_prompt(problem: Problem, sampling: SamplingOptions, lm: MeteredLM, seed: int | None) -> Prompt:
    """The prompt a live run sends for this question: ``bank_prompt`` reworded for the prompt mode
    as the algorithm rewords it, so a bank's samples answer what live runs ask."""
    prompt = bank_prompt(problem, sampling)
    if sampling.prompt_mode is None:
        return prompt
    worded, _ = await apply_prompt_mode(sampling.prompt_mode, lm, prompt, problem.question, seed)
    return worded


BANK_TOP_LOGPROBS = 20
"""Banks keep per-token confidences over this many alternatives (DeepConf's setting), so that
confidence rules replay on them."""


async def draw_bank(backend: Backend, problems: Sequence[Problem], k: int, sampling: SamplingOptions, *,
                    seeds: Sequence[int] | None = None, concurrency: int = 1,
                    on_entry: Callable[[BankEntry], None] | None = None) -> list[BankEntry]:
    """K samples per question, one request with ``n=k`` each, concurrently up to ``concurrency``.
    ``seeds`` gives each question's seed (default: its position). Each entry records the request's
    wall time (``seconds``), so replay can estimate the time a smaller budget would have taken.
    ``on_entry`` sees entries as they finish (to save them). The request sends what a live run
    sends (``sent_prompt``, reworded for a prompt mode) and the entry records it, while its problem
    keeps the dataset's question: replay asks that question plainly and is served these samples."""
    limit = asyncio.Semaphore(concurrency)
    caps = backend.capabilities
    seeds = list(seeds) if seeds is not None else list(range(len(problems)))
    if len(seeds) != len(problems):
        raise ConfigError(f"{len(seeds)} seeds for {len(problems)} problems")

    async def one(index: int, problem: Problem) -> BankEntry:
        params = SamplingParams(n=k, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, stop=sampling.stop, seed=seeds[index],
                                logprobs=sampling.logprobs and caps.logprobs,
                                top_logprobs=max(sampling.top_logprobs, BANK_TOP_LOGPROBS) if caps.logprobs else 0)
        # through a ledger like every run, so a server's short replies are made up request by request
        metered = MeteredLM(backend, Ledger(Budget(generations=k)))
        prompt = await sent_prompt(problem, sampling, metered, seeds[index])
        async with limit:
            started = time.monotonic()
            completion = await metered.generate(prompt, params)
            seconds = time.monotonic() - started
        if len(completion.samples) != k:  # found at once, not as a short bank after the whole draw
            why = f": {completion.error}" if completion.error is not None else ""
            raise BackendError(f"question {problem.id}: asked for {k} samples, got {len(completion.samples)}{why}")
        # the prompt's own tokens (replay charges them once, as one request of n samples would)
        entry = BankEntry(problem, tuple(BankSample.from_sample(s) for s in completion.samples),
                          await backend.prompt_tokens(prompt), prompt.to_dict(), seconds,
                          completion.usage.estimated)
        if on_entry is not None:
            on_entry(entry)
        return entry

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(problems)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return [t.result() for t in tasks]


# --- replayed cells ---------------------------------------------------------------------------


async def replay_cells(bank: SampleBank, algorithm: str, budgets: Sequence[int], *, scorer: str, orders: int,
                       seed: int, price: Price, equivalence: Equivalence | None = None,
                       sampling: SamplingOptions | None = None) -> list[tuple[Row, list[QuestionOutcome]]]:
    name = canonical(algorithm)
    replay_scorer = _REPLAY_SCORERS.get(scorer, scorer)
    points = await replay(bank, name, budgets, orders=orders, seed=seed, scorer=replay_scorer,
                          equivalence=equivalence, sampling=sampling)
    notes = []
    if name != "self-consistency" and replay_scorer == "self-certainty" and not bank.has_logprobs:
        notes.append("the bank has no log-probabilities, so self-certainty scored nothing: this is a majority vote")
    cells = []
    for point in points:
        outcomes = replay_outcomes(bank, point.per_question, point.per_question_tokens, point.first_answers, price)
        cells.append((make_row("apportion", name, point.scorer, point.budget, "replay", outcomes,
                               replay_wall(bank, outcomes), True, point.accuracy_std, point.orders, notes), outcomes))
    return cells


def replay_outcomes(bank: SampleBank, rates: Sequence[float], tokens: Sequence[float],
                    answers: Sequence[str | None], price: Price) -> list[QuestionOutcome]:
    """Per question of a replayed cell: its rate of right answers over the orders, its mean output
    tokens, and the answer of the first order."""
    out = []
    for entry, rate, spent, answer in zip(bank.entries, rates, tokens, answers):
        # One request with n=budget: the prompt is read once, as a live run on a native-n backend.
        usd = float(price.cost(entry.prompt_tokens, 0)) + spent * float(price.per_output_token())
        out.append(QuestionOutcome(entry.problem, rate, entry.prompt_tokens, spent, usd, answer))
    return out


def replay_wall(bank: SampleBank, outcomes: Sequence[QuestionOutcome]) -> float:
    """The wall time a replayed cell would have taken: the bank's request times scaled to the
    tokens used, over the concurrency the bank was drawn with (its requests ran that many at a
    time, so their summed times overstate it). An estimate, marked as one in the rows."""
    parallel = max(1, int(bank.meta.get("concurrency", 1)))
    return sum(_scaled_seconds(e, o.output_tokens) for e, o in zip(bank.entries, outcomes)) / parallel


def _scaled_seconds(entry: BankEntry, tokens: float) -> float:
    """The bank request's time, scaled by the share of its output tokens the budget used: an
    estimate (a batch of fewer samples decodes faster per sample), marked as one in the rows."""
    total = sum(s.output_tokens for s in entry.samples)
    return entry.seconds * (tokens / total) if total else 0.0


# --- live cells -------------------------------------------------------------------------------


async def live_cell(backend: Backend, problems: Sequence[Problem], algorithm: str, budget: int,
                    options: GridOptions, *, equivalence: Equivalence | None = None,
                    progress: Progress | None = None) -> tuple[Row, list[QuestionOutcome]]:
    """Every question answered by a real run of the algorithm with ``Budget(generations=budget)``."""
    eq = equivalence or Equivalence()
    scorer_factory = SCORERS.get(options.scorer)
    name = canonical(algorithm)
    limit = asyncio.Semaphore(options.concurrency)
    done = 0

    async def one(index: int, problem: Problem) -> QuestionOutcome:
        nonlocal done
        algo = make_algorithm(name, options.sampling, scorer_factory() if scorer_factory else None)
        async with limit:
            try:
                result = await algo.run(backend, bank_prompt(problem, options.sampling),
                                        Budget(generations=budget), seed=options.seed + index)
            except RunFailed as exc:  # nothing drawn; what the attempts spent still counts
                s = exc.result.spent
                outcome = QuestionOutcome(problem, 0.0, s.input_tokens, s.output_tokens, float(s.usd), None,
                                          str(exc), {"result": exc.result.to_dict(trace=False)})
            except ApportionError as exc:
                outcome = QuestionOutcome(problem, 0.0, 0, 0, 0.0, None, str(exc))
            else:
                right = result.answer is not None and eq.same(result.answer, problem.answer)
                s = result.spent
                outcome = QuestionOutcome(problem, float(right), s.input_tokens, s.output_tokens, float(s.usd),
                                          result.answer, result.error, {"result": result.to_dict(trace=False)})
        done += 1
        if progress is not None:
            progress(f"{name} @{budget}", done, len(problems))
        return outcome

    started = time.monotonic()
    outcomes = list(await asyncio.gather(*(one(i, p) for i, p in enumerate(problems))))
    wall = time.monotonic() - started
    scorer = None if name == "self-consistency" else options.scorer
    failed = sum(1 for o in outcomes if o.error)
    notes = [f"{failed} question(s) hit a failure (counted wrong where no answer was drawn; their spend is "
             "counted)"] if failed else []
    return make_row("apportion", name, scorer, budget, "live", outcomes, wall, False, notes=notes), outcomes
