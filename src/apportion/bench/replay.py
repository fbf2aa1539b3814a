"""Evaluate sample-based algorithms on a bank instead of a model.

For each of many random orders, every question's samples are shuffled once; budget b takes the
first b of them (drawing without replacement, nested across budgets), and the same selection
code as a live run (``tally``, ``score_tally``) picks the answer. Accuracy is the mean over
questions; the figures are the mean and spread of that accuracy over orders.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from apportion.algorithms.voting import Tally, score_tally, tally
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.errors import ConfigError
from apportion.result import Candidate

REPLAYABLE = ("self-consistency", "best-of-n", "weighted-best-of-n")
SCORERS = ("bank", "self-certainty")


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


def replay(bank: SampleBank, algorithm: str, budgets: Sequence[int], *, orders: int = 100, seed: int = 0,
           scorer: str = "bank", equivalence: Equivalence | None = None) -> list[ReplayPoint]:
    if algorithm not in REPLAYABLE:
        raise ConfigError(f"cannot replay {algorithm!r}; replayable: {', '.join(REPLAYABLE)}")
    if scorer not in SCORERS:
        raise ConfigError(f"unknown replay scorer {scorer!r}; known: {', '.join(SCORERS)}")
    if not budgets or min(budgets) < 1 or max(budgets) > bank.k:
        raise ConfigError(f"budgets must lie in 1..{bank.k} (the bank's samples per question)")
    if orders < 1:
        raise ConfigError("orders must be >= 1")
    eq = equivalence or Equivalence()
    candidates = [[_scored(s.candidate(), scorer) for s in e.samples] for e in bank.entries]
    grades = _Grades(bank, eq)
    rng = np.random.default_rng(seed)
    per_budget: dict[int, list[list[bool]]] = {b: [] for b in budgets}
    tokens: dict[int, list[list[int]]] = {b: [] for b in budgets}
    first: dict[int, list[str | None]] = {}
    for _ in range(orders):
        perms = [rng.permutation(len(c)) for c in candidates]
        for b in budgets:
            right, spent, answers = [], [], []
            for q, (cands, perm) in enumerate(zip(candidates, perms)):
                chosen = [cands[i] for i in perm[:b]]
                spent.append(sum(c.output_tokens for c in chosen))
                answers.append(_select(algorithm, chosen, eq).winner)
                right.append(grades.correct(q, answers[-1]))
            per_budget[b].append(right)
            tokens[b].append(spent)
            first.setdefault(b, answers)
    return [_point(algorithm, scorer if algorithm != "self-consistency" else None, b, per_budget[b],
                   tokens[b], first[b], bank) for b in budgets]


def _select(algorithm: str, chosen: list[Candidate], eq: Equivalence) -> Tally:
    if algorithm == "self-consistency":
        return tally(chosen, eq)
    return score_tally(chosen, eq, weighted=algorithm == "weighted-best-of-n")[0]


def _scored(candidate: Candidate, scorer: str) -> Candidate:
    if scorer == "self-certainty":
        score = None if candidate.mean_logprob is None else math.exp(candidate.mean_logprob)
        return replace(candidate, score=score)
    return candidate


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
           first: list[str | None], bank: SampleBank) -> ReplayPoint:
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
                       per_question, per_question_tokens, tuple(first))
