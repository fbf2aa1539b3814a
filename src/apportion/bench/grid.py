"""The benchmark grid: algorithms x budgets over a dataset, one summary row per cell.

Sample-based algorithms (self-consistency, best-of-N with a log-prob or bank scorer) are
evaluated from a bank: K = max(budgets) samples per question are drawn once, then every budget
up to K is replayed over many random orders (``bench.replay``). Anything else runs live, once
per budget, through the same code path as ``apportion run``. Rows of both kinds share one shape
(``Row``), so tables, plots and peers line up.

Live cells. Each question is asked as ``apportion run`` asks it (the question, and the
algorithm's own system prompt, so a step-wise search gets its step instruction), with
``Budget(generations=budget)`` and the seed ``seed + its position in the dataset``. Step-wise
searches (``is_search``: the registry's ``takes_process_scorer``, a planning run by its base)
are built with a fresh process scorer per question (``GridOptions.process_scorer``, where given:
the registry says which cannot run without one; Tree of Thoughts values its own states) and the
grid's search settings; other algorithms get neither. Answers are judged by the dataset's judge
(``bench.judging``: the gold answer, or the Game of 24 verifier). Each finished question is
handed to ``record`` at once (the run directory's journal, ``bench.journal``), and questions
given in ``done`` are not asked again, so a cut-off cell resumes where it stopped and its row is
the one an uncut run makes.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from apportion.algorithms import registry
from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.prompting import apply_prompt_mode, replayable_prompt_mode
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.steps import SearchOptions
from apportion.algorithms.stopping import StopRule
from apportion.answers.equivalence import Equivalence
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.bench.judging import JUDGES, make_judge
from apportion.bench.replay import REPLAYABLE, replay
from apportion.bench.stats import bootstrap_interval, mean_interval
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price
from apportion.errors import ApportionError, BackendError, ConfigError, RunFailed
from apportion.lm.base import Backend, Prompt, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Result
from apportion.reward import SCORERS
from apportion.reward.process import ProcessScorer

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: a stage's count of finished questions."""
ProcessScorerFactory = Callable[[], ProcessScorer]
SEARCH_FIELDS = ("steps", "round_trips", "requests", "scoring_calls")
"""The figures of a step-wise search (``result.SearchStats``) a row gives as means per question."""

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
    process_scorer: ProcessScorerFactory | None = field(default=None, compare=False)
    """Makes the process scorer of the step-wise searches, a fresh one per question (its prefix
    cache is that question's); required by the searches that cannot run without one, ignored by
    algorithms that are not searches."""
    search: SearchOptions | None = None
    """The step-wise searches' settings (M, aggregation, steps); their sampling is the grid's."""
    judge: str = "gold"
    """How answers are judged (``bench.judging``): "gold", or "game24" (the verifier; never replayed)."""

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise ConfigError("give at least one algorithm")
        if self.judge not in JUDGES:
            raise ConfigError(f"unknown judge {self.judge!r}; known: {', '.join(JUDGES)}")
        for name in self.algorithms:
            make_algorithm(name)  # a clear error for an unknown name, before any sampling
            if needs_process_scorer(name) and self.process_scorer is None:
                raise ConfigError(f"{canonical(name)} needs a process scorer (--process-scorer), what rates each step")
            if is_search(name):
                self.algorithm(name)  # the search settings checked against each search
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
        if self.live or name not in REPLAYABLE or self.judge != "gold":  # a bank's samples carry no verdicts
            return False
        return name == "self-consistency" or self.scorer in _REPLAY_SCORERS

    @property
    def bank_size(self) -> int:
        return max(self.budgets)

    @property
    def process_scorer_name(self) -> str | None:
        return self.process_scorer().name if self.process_scorer is not None else None

    def search_dict(self) -> dict[str, Any] | None:
        """The search settings as the summary and the journal record them (their sampling is the grid's)."""
        if self.search is None:
            return None
        return {k: v for k, v in asdict(self.search).items() if k != "sampling"}

    def algorithm(self, name: str) -> Algorithm:
        """``name`` as a live cell runs it: searches with a fresh process scorer and the search
        settings, the rest with the grid's outcome scorer."""
        if is_search(name):
            scorer = self.process_scorer() if self.process_scorer is not None else None
            return make_algorithm(name, self.sampling, process_scorer=scorer, search=self.search)
        factory = SCORERS.get(self.scorer)
        return make_algorithm(name, self.sampling, factory() if factory else None)


def canonical(algorithm: str) -> str:
    """The algorithm's name in rows; a planning run keeps its base (planning/beam-search), so that
    two bases are two cells."""
    key = registry.canonical(algorithm)
    return key if "/" in key else make_algorithm(algorithm).name


# The registry's word on which algorithms are step-wise searches: the one place the harness asks.


def is_search(algorithm: str) -> bool:
    """Whether ``algorithm`` is built with the process scorer and the search settings."""
    return registry.takes_process_scorer(algorithm)


def needs_process_scorer(algorithm: str) -> bool:
    """Whether ``algorithm`` cannot run without a process scorer."""
    return registry.needs_process_scorer(make_algorithm(algorithm))


def scorer_label(algorithm: Algorithm) -> str | None:
    """What scores the algorithm's candidates, for a row: its process scorer, else its outcome
    scorer, else None (a vote)."""
    options = algorithm.options_dict()
    found = options.get("process_scorer") or options.get("scorer")
    return str(found) if found is not None else None


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
    steps: float | None = None
    """Step-wise searches: mean search steps per question (each one round of step requests)."""
    round_trips: float | None = None
    """Mean round trips per question: the steps plus the rounds of process scoring that made calls."""
    requests: float | None = None
    """Mean step requests per question (one per distinct prefix and step, n = its children)."""
    scoring_calls: float | None = None
    """Mean process-scorer calls per question (a judge's requests, a verifier's checks)."""

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
    search: dict[str, int] | None = None
    """A step-wise search's figures (``SearchStats.to_dict``); None for anything else."""
    seconds: float | None = None
    """A live question's own wall time."""


BOOTSTRAP_DRAWS = 2000


def make_row(system: str, algorithm: str, scorer: str | None, budget: int, mode: str,
             outcomes: Sequence[QuestionOutcome], wall: float, wall_estimated: bool,
             accuracy_std: float | None = None, orders: int | None = None,
             notes: Sequence[str] = (), generations: float | None = None) -> Row:
    """A summary row from per-question outcomes; errors count as wrong (the question was asked).
    The accuracy interval is over questions: for live rows (one right-or-wrong per question) the
    95% percentile bootstrap (seeded, so a row is a function of its outcomes), for replayed rows
    ``mean_interval``. Search figures are means over the questions that report them."""
    rates = [o.right for o in outcomes]
    low, high = (bootstrap_interval(rates, draws=BOOTSTRAP_DRAWS) if mode == "live" and rates
                 else mean_interval(rates))
    levels: dict[str, list[float]] = {}
    for o in outcomes:
        if o.problem.level is not None:
            levels.setdefault(o.problem.level, []).append(o.right)
    mean = statistics.fmean if outcomes else (lambda _: 0.0)
    input_tokens = mean([o.input_tokens for o in outcomes])
    output_tokens = mean([o.output_tokens for o in outcomes])
    searched = [o.search for o in outcomes if o.search is not None]
    figures = {key: statistics.fmean(s.get(key, 0) for s in searched) if searched else None for key in SEARCH_FIELDS}
    return Row(system, algorithm, scorer, budget, mode, len(outcomes), mean(rates), low, high, accuracy_std,
               orders, input_tokens, output_tokens, input_tokens + output_tokens,
               mean([o.usd for o in outcomes]), wall, wall_estimated,
               sum(1 for o in outcomes if o.error), _levels(levels), tuple(notes), generations, **figures)


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
                    progress: Progress | None = None, done: Mapping[str, QuestionOutcome] | None = None,
                    record: Callable[[QuestionOutcome], None] | None = None) -> tuple[Row, list[QuestionOutcome]]:
    """Every question answered by a real run of the algorithm with ``Budget(generations=budget)``;
    ``done`` (by question id) are outcomes of an earlier, cut-off run of this cell, taken as they
    are; ``record`` sees each new outcome as soon as its question finishes. A ConfigError (the
    backend cannot do what the algorithm needs) ends the cell: every question would fail alike."""
    judge = make_judge(options.judge, equivalence or Equivalence())
    name = canonical(algorithm)
    label = scorer_label(options.algorithm(name))
    limit = asyncio.Semaphore(options.concurrency)
    done = {p.id: done[p.id] for p in problems if done and p.id in done}
    finished = len(done)

    def outcome_of(problem: Problem, result: Result, seconds: float, error: str | None) -> QuestionOutcome:
        s = result.spent
        right, answer = judge.judge(problem, result.answer, result.response)
        return QuestionOutcome(problem, float(right), s.input_tokens, s.output_tokens, float(s.usd), answer,
                               error, {"result": result.to_dict(trace=False)},
                               result.search.to_dict() if result.search is not None else None, seconds)

    async def one(index: int, problem: Problem) -> QuestionOutcome:
        nonlocal finished
        algo = options.algorithm(name)
        async with limit:
            started = time.monotonic()
            try:
                result = await algo.run(backend, problem.question, Budget(generations=budget),
                                        seed=options.seed + index)
            except RunFailed as exc:  # nothing drawn; what the attempts spent still counts
                outcome = outcome_of(problem, exc.result, time.monotonic() - started, str(exc))
            except ConfigError:
                raise
            except ApportionError as exc:
                outcome = QuestionOutcome(problem, 0.0, 0, 0, 0.0, None, str(exc), seconds=time.monotonic() - started)
            else:
                outcome = outcome_of(problem, result, time.monotonic() - started, result.error)
        if record is not None:
            record(outcome)
        finished += 1
        if progress is not None:
            progress(f"{name} @{budget}", finished, len(problems))
        return outcome

    if progress is not None:
        progress(f"{name} @{budget}", finished, len(problems))
    started = time.monotonic()
    tasks = {p.id: asyncio.ensure_future(one(i, p)) for i, p in enumerate(problems) if p.id not in done}
    try:
        await asyncio.gather(*tasks.values())
    finally:  # one question's exception (or a cancel) ends the cell: the rest stop too, none left running
        for task in tasks.values():
            task.cancel()
    wall = time.monotonic() - started
    outcomes = [done[p.id] if p.id in done else tasks[p.id].result() for p in problems]
    notes = []
    if done:
        # the earlier run's questions took their own time, as many at once as the concurrency
        wall += sum(o.seconds or 0.0 for o in done.values()) / options.concurrency
        notes.append(f"{len(done)} of {len(problems)} question(s) were answered before a --resume: the wall time "
                     "adds their own times over the concurrency")
    failed = sum(1 for o in outcomes if o.error)
    if failed:
        notes.append(f"{failed} question(s) hit a failure (counted wrong where no answer was drawn; their spend is "
                     "counted)")
    return make_row("apportion", name, label, budget, "live", outcomes, wall, bool(done), notes=notes), outcomes
