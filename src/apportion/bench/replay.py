"""Evaluate sample-based algorithms on a bank instead of a model, with the live code.

For each of many random orders, a ``ReplayBackend`` serves every question's recorded samples in
that order's shuffle, and the real algorithm runs on it through the ledger: budget b draws the
first b samples (nested across budgets), and whatever the algorithm does live (its selection,
its stopping rule, its scorer) it does here. Accuracy is the mean over questions; the figures
are the mean and spread of that accuracy over orders.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.prompting import parse_prompt_mode, spell_prompt_mode
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.stopping import StopRule
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.replay import ReplayBackend
from apportion.reward.base import OutcomeScorer
from apportion.reward.recorded import RecordedScorer
from apportion.reward.self_certainty import SelfCertainty

REPLAYABLE = ("self-consistency", "best-of-n", "weighted-best-of-n")
SCORERS: dict[str, Callable[[SampleBank], OutcomeScorer]] = {"bank": RecordedScorer,
                                                             "self-certainty": lambda _: SelfCertainty()}


@dataclass(frozen=True, slots=True)
class ReplayPoint:
    algorithm: str
    scorer: str | None
    budget: int
    accuracy: float
    """Mean over orders of the fraction of questions answered correctly."""
    accuracy_std: float
    """Spread of that accuracy over orders (population standard deviation)."""
    output_tokens: float
    """Mean output tokens spent per question."""
    orders: int
    by_level: dict[str, float]
    per_question: tuple[float, ...] = ()
    """Each question's rate of being answered right over the orders (their mean is ``accuracy``)."""
    per_question_tokens: tuple[float, ...] = ()
    """Each question's mean output tokens over the orders."""
    first_answers: tuple[str | None, ...] = ()
    """The answer each question got in the first order (the one ReplayBackend serves for ``seed``)."""
    generations: float = 0.0
    """Mean samples drawn per question (below the budget where a stopping rule ended runs)."""


async def replay(bank: SampleBank, algorithm: str, budgets: Sequence[int], *, orders: int = 100, seed: int = 0,
                 scorer: str = "bank", equivalence: Equivalence | None = None,
                 sampling: SamplingOptions | None = None, stopping: StopRule | None = None) -> list[ReplayPoint]:
    """One point per budget; order ``o`` is ``ReplayBackend(bank, seed=seed + o)``, so the first
    order of every point is what a live run on that backend gets."""
    if algorithm not in REPLAYABLE:
        raise ConfigError(f"cannot replay {algorithm!r}; replayable: {', '.join(REPLAYABLE)}")
    if scorer not in SCORERS:
        raise ConfigError(f"unknown replay scorer {scorer!r}; known: {', '.join(SCORERS)}")
    if not budgets or min(budgets) < 1 or max(budgets) > bank.k:
        raise ConfigError(f"budgets must lie in 1..{bank.k} (the bank's samples per question)")
    if orders < 1:
        raise ConfigError("orders must be >= 1")
    eq = equivalence or Equivalence()
    sampling = sampling or SamplingOptions()
    # log-probabilities asked for only where the bank has them, and never against the caller's wish;
    # no prompt mode: the samples already answered the reworded prompt, and the bank is matched on
    # the plain question
    sampling = replace(sampling, logprobs=sampling.logprobs and bank.has_logprobs, prompt_mode=None)
    score = SCORERS[scorer](bank)
    grades = _Grades(bank, eq)

    def algo() -> Algorithm:
        made = make_algorithm(algorithm, sampling, score, stopping)
        made.equivalence = eq
        return made

    points = []
    for b in budgets:
        right: list[list[bool]] = []
        tokens: list[list[int]] = []
        drawn: list[int] = []
        first: list[str | None] = []
        for order in range(orders):
            lm = ReplayBackend(bank, seed=seed + order)
            run_right, run_tokens = [], []
            for q, entry in enumerate(bank.entries):
                result = await algo().run(lm, entry.problem.question, Budget(generations=b), seed=seed + order)
                run_right.append(grades.correct(q, result.answer))
                run_tokens.append(result.spent.output_tokens)
                drawn.append(result.spent.generations)
                if not order:
                    first.append(result.answer)
            right.append(run_right)
            tokens.append(run_tokens)
        points.append(_point(algorithm, scorer if algorithm != "self-consistency" else None, b, right, tokens,
                             first, bank, statistics.fmean(drawn)))
    return points


def bank_prompt_mode(meta: Mapping[str, Any]) -> str:
    """The prompt mode a bank was drawn with, as ``--prompt-mode`` spells it ("plain" for banks
    drawn before modes were recorded, which were all plain)."""
    recorded = meta.get("prompt_mode", "plain")
    if not isinstance(recorded, str):
        raise ConfigError(f"the bank's prompt_mode {recorded!r} is not a prompt mode")
    return spell_prompt_mode(parse_prompt_mode(recorded))


def bank_sampling(meta: Mapping[str, Any], default: SamplingOptions) -> SamplingOptions:
    """The sampling options a bank was drawn with (``default`` where it recorded none), for
    replaying it: without a prompt mode, since its samples already answered the reworded prompt."""
    recorded = meta.get("sampling")
    if not isinstance(recorded, dict):
        return replace(default, prompt_mode=None)
    fields: dict[str, Any] = {k: tuple(v) if k == "stop" else v for k, v in recorded.items()
                              if k in SamplingOptions.__slots__ and k != "prompt_mode"}
    return SamplingOptions(**fields)


class _Grades:
    """Whether an answer is right for a question, decided once per distinct answer."""

    def __init__(self, bank: SampleBank, eq: Equivalence) -> None:
        self._gold = [e.problem.answer for e in bank.entries]
        self._eq = eq
        self._cache: dict[tuple[int, str], bool] = {}

    def correct(self, question: int, answer: str | None) -> bool:
        if answer is None:
            return False
        key = (question, answer)
        if key not in self._cache:
            self._cache[key] = self._eq.same(answer, self._gold[question])
        return self._cache[key]


def _point(algorithm: str, scorer: str | None, budget: int, runs: list[list[bool]], tokens: list[list[int]],
           first: list[str | None], bank: SampleBank, generations: float) -> ReplayPoint:
    accuracies = [sum(r) / len(r) for r in runs]
    per_question = tuple(sum(col) / len(runs) for col in zip(*runs))
    per_question_tokens = tuple(sum(col) / len(runs) for col in zip(*tokens))
    levels: dict[str, list[bool]] = {}
    for run in runs:
        for entry, ok in zip(bank.entries, run):
            if entry.problem.level is not None:
                levels.setdefault(entry.problem.level, []).append(ok)
    return ReplayPoint(algorithm, scorer, budget, statistics.fmean(accuracies), statistics.pstdev(accuracies),
                       statistics.fmean(per_question_tokens), len(runs),
                       {level: sum(v) / len(v) for level, v in sorted(levels.items())},
                       per_question, per_question_tokens, tuple(first), generations)
