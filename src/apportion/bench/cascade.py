"""A cascade against each of its models alone, at equal dollars, replayed over banks of the same
questions.

Questions are split in two folds. On one fold (development) every configuration is chosen from
simulated votes of the banks (``allocate.cascade_choice``): for each model alone, the sample
count with the best accuracy at or under the dollar budget per question; for the cascade, the
sample counts, confidence kind and threshold. Each choice is then run on the other fold
(held out) with the real engine: ``answer_batch`` under a total of the budget times the fold's
questions, ``CascadePolicy`` (one model alone is a cascade of one), each model a ``ReplayBackend``
of its bank at its price, so every call is reserved and settled by the ledger as it would be live,
and no configuration spends more than the others may. Both folds are held out once; accuracy
is the mean over replay orders per question, with 95% bootstrap intervals over questions and
paired intervals of the cascade's difference from each model alone. The model and sample count
chosen on the development fold over all models (cheap-many versus expensive-few) is reported
per fold with its held-out accuracy.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.allocate.cascade import CONFIDENCES, Cascade, CascadeOptions, CascadePolicy
from apportion.allocate.cascade_choice import (
    CascadeConfig,
    Expected,
    Simulated,
    StageBank,
    best_single,
    check_aligned,
    choose,
    configurations,
    expected,
    folds_of,
    simulate,
)
from apportion.allocate.engine import answer_batch
from apportion.allocate.models import ModelCost, cost_table
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.batch import Item
from apportion.bench.replay import _Grades
from apportion.bench.stats import bootstrap_interval, paired_difference
from apportion.budget.prices import price_to_json
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.replay import ReplayBackend

DEFAULT_KS = (1, 2, 3, 4, 6, 8, 12, 16)
# Replay orders of different models must not share a permutation: offset the later models' seeds.
_MODEL_SEED_STRIDE = 100_003


@dataclass(frozen=True, slots=True)
class CascadeBench:
    stages: tuple[StageBank, ...]
    """Cheapest first."""
    budgets: tuple[float, ...]
    """Mean dollars per question."""
    orders: int = 10
    """Replay orders of each held-out run."""
    choice_orders: int = 20
    """Simulated orders the choices are made on."""
    seed: int = 0
    ks: tuple[int, ...] = DEFAULT_KS
    confidences: tuple[str, ...] = CONFIDENCES
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    equivalence: Equivalence = field(default_factory=Equivalence)

    def __post_init__(self) -> None:
        if len(self.stages) < 2:
            raise ConfigError("a cascade needs at least two banks, cheapest first")
        if not self.budgets or any(not b > 0 for b in self.budgets):
            raise ConfigError("give one or more dollar budgets per question, each > 0")
        if self.orders < 1 or self.choice_orders < 1:
            raise ConfigError("orders must be >= 1")
        if any(s.price.free for s in self.stages):
            raise ConfigError("every model needs a price: a dollar comparison of a free model means nothing")
        check_aligned(self.stages)


@dataclass(frozen=True, slots=True)
class HeldOut:
    """One configuration run on one held-out fold with the engine."""

    config: CascadeConfig
    questions: tuple[int, ...]
    right: tuple[float, ...]
    """Per question: the share of orders it was answered right."""
    usd: tuple[float, ...]
    """Per question: mean dollars over orders."""
    escalated: float
    generations: dict[str, float]
    """Mean samples per question drawn from each model."""


def replay_sampling(stages: Sequence[StageBank], sampling: SamplingOptions) -> SamplingOptions:
    """Sampling as the banks were drawn (their max_tokens and system prompt), and no sample
    started that the budget cannot give its whole max_tokens: a replayed sample is served whole,
    so a sample cut short by a clamped reservation would be charged past it."""
    drawn = stages[0].bank.meta.get("sampling") or {}
    max_tokens = int(drawn.get("max_tokens", sampling.max_tokens))
    return replace(sampling, max_tokens=max_tokens, min_tokens=max_tokens,
                   system_prompt=drawn.get("system_prompt", sampling.system_prompt))


async def run_held_out(bench: CascadeBench, config: CascadeConfig, questions: Sequence[int],
                       budget: float) -> HeldOut:
    """``config`` over ``questions`` with the engine, ``bench.orders`` times, under a total of
    ``budget`` dollars per question."""
    stages = [bench.stages[m] for m in config.models]
    subs = [SampleBank([s.bank.entries[q] for q in questions], s.bank.meta) for s in stages]
    grades = _Grades(subs[0], bench.equivalence)
    sampling = replay_sampling(bench.stages, bench.sampling)
    items = [Item(n + 1, e.problem.id, e.problem.question) for n, e in enumerate(subs[0].entries)]
    names = tuple(s.name for s in stages)

    def make(name: str) -> Algorithm:
        made: Algorithm = Cascade(options=CascadeOptions(sampling)) if name == "cascade" else \
            make_algorithm(name, sampling)
        made.equivalence = bench.equivalence
        return made

    right: list[list[bool]] = []
    usd: list[list[float]] = []
    escalated: list[float] = []
    drawn = dict.fromkeys(names, 0.0)
    for order in range(bench.orders):
        backends = {s.name: ReplayBackend(sub, seed=bench.seed + order + _MODEL_SEED_STRIDE * i, model=s.name,
                                          price=s.price)
                    for i, (s, sub) in enumerate(zip(stages, subs))}
        policy = CascadePolicy(names, config.samples, config.thresholds, config.confidence,
                               equivalence=bench.equivalence)
        result = await answer_batch(items, backends[names[0]], Budget(usd=budget * len(items)), policy, make,
                                    algorithm="cascade", max_tokens=sampling.max_tokens,
                                    system_prompt=sampling.system_prompt, concurrency=8, seed=bench.seed + order,
                                    backends=backends)
        right.append([grades.correct(q, o.result.answer if o.result else None) for q, o in enumerate(result.outcomes)])
        usd.append([float(o.result.spent.usd) if o.result else 0.0 for o in result.outcomes])
        models = [{c.model for c in o.result.candidates} if o.result else set() for o in result.outcomes]
        escalated.append(statistics.fmean(len(m) > 1 for m in models))
        for o in result.outcomes:
            for c in o.result.candidates if o.result else ():
                drawn[c.model or ""] = drawn.get(c.model or "", 0.0) + 1 / (bench.orders * len(items))
    return HeldOut(config, tuple(questions), tuple(statistics.fmean(col) for col in zip(*right)),
                   tuple(statistics.fmean(col) for col in zip(*usd)), statistics.fmean(escalated), drawn)


async def run_cascade_bench(bench: CascadeBench) -> dict[str, Any]:
    """Every budget: the choices per fold and their held-out figures (the module docstring)."""
    sim = simulate(bench.stages, orders=bench.choice_orders, seed=bench.seed, equivalence=bench.equivalence)
    names = sim.names
    folds = folds_of(sim.questions)
    sampling = replay_sampling(bench.stages, bench.sampling)
    costs = [ModelCost.from_bank(s.name, s.price, s.bank) for s in bench.stages]
    rows = []
    for budget in bench.budgets:
        arms: dict[str, list[tuple[Expected, HeldOut]]] = {}
        best: list[Expected | None] = []
        for test, dev in ((folds[0], folds[1]), (folds[1], folds[0])):
            best.append(best_single(sim, bench.ks, dev, budget=budget))
            chosen: dict[str, Expected | None] = {
                f"{name} alone": choose(sim, configurations(sim, [m], bench.ks), dev, budget=budget)
                for m, name in enumerate(names)}
            chosen["cascade"] = choose(sim, configurations(sim, list(range(len(names))), bench.ks,
                                                           confidences=bench.confidences, questions=dev),
                                       dev, budget=budget)
            for arm, pick in chosen.items():
                if pick is None:
                    arms.setdefault(arm, [])
                    continue
                arms.setdefault(arm, []).append((pick, await run_held_out(bench, pick.config, test, budget)))
        row = _row(budget, arms, sim, names)
        row["best_single"] = [None if pick is None else {
            **pick.to_dict(names), "held_out_accuracy": statistics.fmean(
                arms[f"{names[pick.config.models[0]]} alone"][fold][1].right)} for fold, pick in enumerate(best)]
        rows.append(row)
    return {"models": [{"name": s.name, "price": price_to_json(s.price),
                        "bank_model": s.bank.meta.get("model"), "questions": len(s.bank.entries),
                        "samples_per_question": s.bank.k} for s in bench.stages],
            "cost_table": cost_table(costs, [k for k in (1, 2, 4, 8, 16) if k <= sim.k], sampling.max_tokens),
            "in_sample": [_in_sample(sim, m, k) for m in range(len(names)) for k in (1, 2, 4, 8, 16) if k <= sim.k],
            "orders": bench.orders, "choice_orders": bench.choice_orders, "seed": bench.seed,
            "max_tokens": sampling.max_tokens, "ks": list(bench.ks), "confidences": list(bench.confidences),
            "rows": rows}


def _in_sample(sim: Simulated, model: int, k: int) -> dict[str, Any]:
    e = expected(sim, CascadeConfig((model,), (k,)))
    return {"model": sim.names[model], "k": k, "accuracy": e.accuracy, "usd_per_question": e.usd}


def _row(budget: float, arms: dict[str, list[tuple[Expected, HeldOut]]], sim: Simulated,
         names: Sequence[str]) -> dict[str, Any]:
    """One budget: each arm's held-out accuracy over all questions (each held out once)."""
    per_arm: dict[str, list[float]] = {}
    out: dict[str, Any] = {"usd_per_question": budget, "arms": {}}
    for arm, runs in arms.items():
        right = [0.0] * sim.questions
        usd = [0.0] * sim.questions
        covered = 0
        for _, held in runs:
            for q, r, u in zip(held.questions, held.right, held.usd):
                right[q], usd[q] = r, u
            covered += len(held.questions)
        if covered != sim.questions:
            out.setdefault("unaffordable", []).append(arm)  # nothing fitted the budget on some fold
            continue
        per_arm[arm] = right
        low, high = bootstrap_interval(right)
        generations: dict[str, float] = {}
        for _, held in runs:
            for model, n in held.generations.items():
                generations[model] = generations.get(model, 0.0) + n * len(held.questions) / sim.questions
        out["arms"][arm] = {
            "accuracy": statistics.fmean(right), "interval": [low, high],
            "usd_per_question": statistics.fmean(usd),
            "escalated": sum(h.escalated * len(h.questions) for _, h in runs) / sim.questions,
            "samples_per_question": generations,
            "folds": [{"chosen": pick.to_dict(names), "held_out_accuracy": statistics.fmean(held.right),
                       "held_out_usd_per_question": statistics.fmean(held.usd), "questions": len(held.questions)}
                      for pick, held in runs],
            "per_question": right}
    if "cascade" in per_arm:
        out["cascade_minus"] = {arm: list(paired_difference(per_arm["cascade"], right))
                                for arm, right in per_arm.items() if arm != "cascade"}
    return out
