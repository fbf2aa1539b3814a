"""Allocation policies replayed over a sample bank: one total budget over the bank's questions,
the real engine and algorithms on ``ReplayBackend``, so every policy sees identical samples.

The total is a mean per question times the number of questions. Each order is a fresh shuffle of
every question's samples; accuracy is the mean over orders, with a bootstrap interval over
questions, and every policy is compared with a baseline on the same questions and orders (a
paired interval of the difference). ``difficulty-bins`` and ``compute-optimal`` need a strategy
table chosen on other questions: the questions are split in two folds, the table for each fold is chosen on the other
(cross-fitting), so no question's own outcome picks its strategy.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.allocate.difficulty import Estimator, quantile_edges
from apportion.allocate.engine import BatchResult, answer_batch
from apportion.allocate.learned import LearnedEstimator
from apportion.allocate.policies import BinStrategy, StrategyTable, ThinkRoute, make_policy
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.batch import Item
from apportion.bench.replay import SCORERS, _Grades
from apportion.bench.stats import bootstrap_interval, paired_difference
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.replay import ReplayBackend


@dataclass(frozen=True, slots=True)
class PolicyCell:
    policy: str
    algorithm: str
    per_question: tuple[float, ...]
    """Each question's rate of being answered right over the orders."""
    accuracy: float
    accuracy_std: float
    """Spread of the accuracy over orders."""
    tokens: float
    """Mean tokens (input + output) spent per question."""
    generations: float
    orders: int
    budget: Budget
    """The mean budget per question."""
    per_bin: dict[str, dict[str, float]] = field(default_factory=dict)
    tables: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        low, high = bootstrap_interval(self.per_question)
        return {"policy": self.policy, "algorithm": self.algorithm, "accuracy": self.accuracy,
                "interval": [low, high], "accuracy_std_over_orders": self.accuracy_std,
                "tokens_per_question": self.tokens, "generations_per_question": self.generations,
                "orders": self.orders, "budget_per_question": self.budget.to_dict(), "per_bin": self.per_bin,
                "tables": list(self.tables), "per_question": list(self.per_question)}


@dataclass(frozen=True, slots=True)
class ReplaySetup:
    bank: SampleBank
    mean: Budget
    orders: int = 20
    seed: int = 0
    scorer: str = "bank"
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    probe: int = 2
    equivalence: Equivalence = field(default_factory=Equivalence)
    estimator: Estimator | None = None
    """The difficulty estimator of the probing policies (None: the agreement estimator)."""
    think_bank: SampleBank | None = None
    """A bank of direct answers (no reasoning) to the same questions: the probing policies probe
    with it and answer a prompt whose direct answers agree (think / no-think routing)."""

    def __post_init__(self) -> None:
        if self.orders < 1:
            raise ConfigError("orders must be >= 1")
        if self.scorer not in SCORERS:
            raise ConfigError(f"unknown replay scorer {self.scorer!r}; known: {', '.join(SCORERS)}")
        if self.think_bank is not None:
            have = {e.problem.question for e in self.think_bank.entries}
            missing = sum(e.problem.question not in have for e in self.bank.entries)
            if missing:
                raise ConfigError(f"the direct-answer bank lacks {missing} of the bank's questions: "
                                  "both arms must answer the same questions")
        if self.mean.seconds is not None:
            raise ConfigError("a replayed batch has no wall clock: give the mean budget in generations, tokens "
                              "or dollars")


async def replay_policy(setup: ReplaySetup, policy: str, algorithm: str, *,
                        table: StrategyTable | None = None, questions: Sequence[int] | None = None) -> PolicyCell:
    """``policy`` with ``algorithm`` over the bank (or the ``questions`` given), ``orders`` times.
    ``compute-optimal`` without a ``table`` is cross-fitted over two folds."""
    if policy in TABLED and table is None:
        return await _cross_fitted(setup, policy, algorithm, questions)
    right, tokens, gens = [], [], []
    per_bin: dict[str, list[float]] = {}
    for order in range(setup.orders):
        result, oks = await _one_batch(setup, policy, algorithm, questions, order, table)
        right.append(oks)
        tokens.append(result.spent.input_tokens + result.spent.output_tokens)
        gens.append(result.spent.generations)
        for o, ok in zip(result.outcomes, oks):
            per_bin.setdefault(str((o.allocation or {}).get("bin")), []).append(ok)
    items = len(right[0])
    accuracies = [sum(r) / len(r) for r in right]
    return PolicyCell(policy, algorithm, tuple(sum(col) / len(right) for col in zip(*right)),
                      statistics.fmean(accuracies), statistics.pstdev(accuracies),
                      statistics.fmean(tokens) / items, statistics.fmean(gens) / items, setup.orders,
                      setup.mean, {b: {"accuracy": statistics.fmean(v), "prompts": len(v) / setup.orders}
                                   for b, v in sorted(per_bin.items())})


async def choose_table(setup: ReplaySetup, questions: Sequence[int], algorithms: Sequence[str],
                       bins: int = 5) -> StrategyTable:
    """Per difficulty bin, the algorithm that beat the first of ``algorithms`` (the batch's) on
    ``questions`` under marginal-gain allocation, by a paired bootstrap interval over the bin's
    questions that excludes zero; otherwise the batch's. A bin of ten development questions
    rarely separates two selectors, and switching on noise cost points in replay, so the table
    moves away from the batch's algorithm only on evidence. Edges are the quantiles of those
    questions' estimated difficulty after the probe."""
    base = algorithms[0]
    dev = replace(setup, orders=max(1, setup.orders // 2))
    # right[name][q][bin] = outcomes of question q when it fell in bin over the orders
    right: dict[str, dict[int, dict[int, list[float]]]] = {}
    difficulty: list[float] = []
    for name in algorithms:
        per_question: dict[int, dict[int, list[float]]] = {}
        for order in range(dev.orders):
            for q, (allocation, ok) in enumerate(await _marginal_run(dev, name, questions, order)):
                if allocation.get("bin") is not None:
                    b = min(int(allocation["bin"]), bins - 1)
                    per_question.setdefault(q, {}).setdefault(b, []).append(ok)
                if name == base and "difficulty" in allocation:
                    difficulty.append(float(allocation["difficulty"]))
        right[name] = per_question
    chosen = []
    for b in range(bins):
        best: tuple[float, str] | None = None
        for name in algorithms[1:]:
            diffs = [statistics.fmean(right[name][q][b]) - statistics.fmean(right[base][q][b])
                     for q in right[base] if b in right[base][q] and b in right[name].get(q, {})]
            if len(diffs) < 2:
                continue
            mean, low, _ = paired_difference(diffs, [0.0] * len(diffs))
            if low > 0 and (best is None or mean > best[0]):
                best = (mean, name)
        chosen.append(BinStrategy(best[1] if best else base))
    return StrategyTable(tuple(chosen), quantile_edges(difficulty, bins))


async def _marginal_run(setup: ReplaySetup, algorithm: str, questions: Sequence[int],
                        order: int) -> list[tuple[dict[str, Any], float]]:
    """(allocation, right) per question of one marginal-gain order over ``questions``, in orders
    of its own (a development run never replays the orders its fold's evaluation will)."""
    result, oks = await _one_batch(setup, "marginal-gain", algorithm, questions, 7_777 + order, None)
    return [(o.allocation or {}, ok) for o, ok in zip(result.outcomes, oks)]


async def _one_batch(setup: ReplaySetup, policy: str, algorithm: str, questions: Sequence[int] | None,
                     order: int, table: StrategyTable | None) -> tuple[BatchResult, list[float]]:
    """One replayed batch over the bank's ``questions`` (all by default) in serving order
    ``order``, and whether each was answered right."""
    bank = setup.bank
    picked = list(questions) if questions is not None else list(range(len(bank.entries)))
    sub = SampleBank([bank.entries[q] for q in picked], bank.meta)
    grades = _Grades(sub, setup.equivalence)
    sampling = replace(setup.sampling, logprobs=setup.sampling.logprobs and bank.has_logprobs)
    scorer = SCORERS[setup.scorer](bank)
    items = [Item(n + 1, e.problem.id, e.problem.question) for n, e in enumerate(sub.entries)]

    def make(name: str) -> Algorithm:
        made = make_algorithm(name, sampling, scorer)
        made.equivalence = setup.equivalence
        return made

    think = ThinkRoute(model="direct") if setup.think_bank is not None and policy not in STREAMED else None
    chosen = make_policy(policy, probe=setup.probe, horizon=sub.k, table=table, equivalence=setup.equivalence,
                         estimator=setup.estimator, think=think)
    result = await answer_batch(items, ReplayBackend(sub, seed=setup.seed + order), _scaled(setup.mean, len(items)),
                                chosen, make, algorithm=algorithm, max_tokens=sampling.max_tokens,
                                system_prompt=sampling.system_prompt, concurrency=8, seed=setup.seed + order,
                                max_samples=sub.k,
                                backends=_think_backends(setup, questions, order) if think else None)
    return result, [float(grades.correct(q, o.result.answer if o.result else None))
                    for q, o in enumerate(result.outcomes)]


SELECTORS = ("self-consistency", "best-of-n", "weighted-best-of-n")
TABLED = ("difficulty-bins", "compute-optimal")
"""Policies with a strategy per bin: replayed with a table chosen on the other fold."""


async def _cross_fitted(setup: ReplaySetup, policy: str, algorithm: str, questions: Sequence[int] | None,
                        algorithms: Sequence[str] = SELECTORS) -> PolicyCell:
    picked = list(questions) if questions is not None else list(range(len(setup.bank.entries)))
    folds = [picked[0::2], picked[1::2]]
    cells, tables = [], []
    for test, dev in ((folds[0], folds[1]), (folds[1], folds[0])):
        table = await choose_table(setup, dev, [algorithm, *(a for a in algorithms if a != algorithm)])
        tables.append(table.to_dict())
        cells.append(await replay_policy(setup, policy, algorithm, table=table, questions=test))
    per_question = [0.0] * len(picked)
    position = {q: i for i, q in enumerate(picked)}
    for fold, cell in zip((folds[0], folds[1]), cells):
        for q, rate in zip(fold, cell.per_question):
            per_question[position[q]] = rate
    weights = [len(folds[0]), len(folds[1])]
    mean = sum(w * c.accuracy for w, c in zip(weights, cells)) / sum(weights)
    return PolicyCell(policy, algorithm, tuple(per_question), mean,
                      max(c.accuracy_std for c in cells),
                      sum(w * c.tokens for w, c in zip(weights, cells)) / sum(weights),
                      sum(w * c.generations for w, c in zip(weights, cells)) / sum(weights),
                      setup.orders, setup.mean, {}, tuple(tables))


STREAMED = ("uniform", "front-load", "back-load")


def _think_backends(setup: ReplaySetup, questions: Sequence[int] | None, order: int) -> dict[str, ReplayBackend]:
    """The direct-answer arm, on the same questions as the batch."""
    assert setup.think_bank is not None
    bank = setup.think_bank
    wanted = {setup.bank.entries[q].problem.question for q in (questions if questions is not None
                                                               else range(len(setup.bank.entries)))}
    sub = SampleBank([e for e in bank.entries if e.problem.question in wanted], bank.meta)
    return {"direct": ReplayBackend(sub, seed=setup.seed + 31 + order, model="direct")}


def _scaled(mean: Budget, questions: int) -> Budget:
    """The total budget: ``mean`` per question over ``questions`` (whole units stay whole)."""
    out: dict[str, Any] = {}
    for unit in ("generations", "input_tokens", "output_tokens", "total_tokens", "usd"):
        value = getattr(mean, unit)
        if value is not None:
            out[unit] = value * questions if unit == "usd" else round(value * questions)
    return Budget(**out)


async def compare_policies(setup: ReplaySetup, policies: Sequence[str], algorithms: Sequence[str]) -> dict[str, Any]:
    """Every policy with every algorithm at the same mean budget, each beside uniform allocation
    with the same algorithm (allocation alone) and beside uniform self-consistency (the whole
    system against the usual baseline), paired over questions."""
    wanted = list(dict.fromkeys(["uniform", "equal-samples", *policies]))
    cells: dict[tuple[str, str], PolicyCell] = {}
    for name in dict.fromkeys(["self-consistency", *algorithms]):
        for policy in wanted if name in algorithms else ["uniform", "equal-samples"]:
            cells[(policy, name)] = await replay_policy(setup, policy, name)
    base = cells[("uniform", "self-consistency")]
    # the best fixed strategy spent evenly, under either way of spending evenly
    best_fixed = max((c for (p, _), c in cells.items() if p in ("uniform", "equal-samples")),
                     key=lambda c: c.accuracy)
    rows = []
    for (_, name), cell in cells.items():
        row = cell.to_dict()
        row["vs_uniform_same_algorithm"] = list(paired_difference(cell.per_question,
                                                                  cells[("uniform", name)].per_question))
        row["vs_equal_samples_same_algorithm"] = list(paired_difference(
            cell.per_question, cells[("equal-samples", name)].per_question))
        row["vs_uniform_self_consistency"] = list(paired_difference(cell.per_question, base.per_question))
        row["vs_best_fixed"] = list(paired_difference(cell.per_question, best_fixed.per_question))
        rows.append(row)
    return {"bank": setup.bank.meta, "questions": len(setup.bank.entries), "samples_per_question": setup.bank.k,
            "budget_per_question": setup.mean.to_dict(), "orders": setup.orders, "probe": setup.probe,
            "estimator": setup.estimator.to_dict() if isinstance(setup.estimator, LearnedEstimator) else "agreement",
            "think_bank": None if setup.think_bank is None else setup.think_bank.meta,
            "scorer": setup.scorer, "best_fixed": {"policy": best_fixed.policy, "algorithm": best_fixed.algorithm},
            "rows": rows}
