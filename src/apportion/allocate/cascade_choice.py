"""Choosing a cascade, or a model and a sample count, from sample banks of the same questions.

``simulate`` replays, for every model, question and random order, the vote of the first k
samples: whether it is right, its confidence (``allocate.cascade.confidence``, both kinds) and
what one batched call of k samples costs at the model's price (the prompt paid once, the samples'
recorded tokens). Any cascade's expected accuracy and dollars per question then follow without
drawing anything: a question escalates where the cheaper model's confidence is below the
threshold, and pays for the next model's samples only then.

``choose`` picks the configuration (sample counts, confidence kind, thresholds) that maximises
accuracy at or under a mean dollar budget per question, or the utility accuracy - weight * dollars,
on the questions it is given. ``cross_fit`` never lets a question choose its own configuration:
the questions are split in two, each half is scored with the configuration chosen on the other.

``best_single`` is the cheap-many versus expensive-few choice: the model and sample count with
the best accuracy the budget affords, from banks (``simulate``) or from fitted scaling laws
(``points_from_laws``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apportion.algorithms.voting import tally
from apportion.allocate.cascade import CONFIDENCES, confidence
from apportion.allocate.models import ModelCost
from apportion.allocate.scaling import ScalingLaw
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import placeholder_in, read_answer_for
from apportion.banks import BankSample, SampleBank
from apportion.budget.units import Price
from apportion.errors import ConfigError
from apportion.result import Candidate

_TOLERANCE = 1e-12


@dataclass(frozen=True, slots=True)
class StageBank:
    """One model of a cascade: its name, its bank, its price."""

    name: str
    bank: SampleBank
    price: Price


@dataclass(frozen=True, slots=True)
class Simulated:
    """Per model s, sample count k (index k - 1), question q and order o: the k-vote's rightness,
    confidence (per kind) and dollars."""

    names: tuple[str, ...]
    right: np.ndarray
    usd: np.ndarray
    confidence: Mapping[str, np.ndarray]

    @property
    def k(self) -> int:
        return int(self.right.shape[1])

    @property
    def questions(self) -> int:
        return int(self.right.shape[2])


@dataclass(frozen=True, slots=True)
class CascadeConfig:
    """A cascade over ``models`` (one model: that model alone)."""

    models: tuple[int, ...]
    samples: tuple[int, ...]
    thresholds: tuple[float, ...] = ()
    confidence: str = "vote"

    def describe(self, names: Sequence[str]) -> dict[str, Any]:
        return {"models": [names[m] for m in self.models], "samples": list(self.samples),
                "thresholds": [round(t, 6) for t in self.thresholds], "confidence": self.confidence}


@dataclass(frozen=True, slots=True)
class Expected:
    """A configuration's expected figures on some questions (means over orders, then questions)."""

    config: CascadeConfig
    accuracy: float
    usd: float
    """Mean dollars per question."""
    escalated: float
    """Share of questions sent past the first model."""
    per_question: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        return {**self.config.describe(names), "accuracy": self.accuracy, "usd_per_question": self.usd,
                "escalated": self.escalated}


def check_aligned(stages: Sequence[StageBank]) -> None:
    """The banks must ask the same questions in the same order."""
    if not stages:
        raise ConfigError("no banks given")
    first = stages[0].bank.entries
    for stage in stages[1:]:
        entries = stage.bank.entries
        if len(entries) != len(first):
            raise ConfigError(f"bank {stage.name!r} has {len(entries)} questions, {stages[0].name!r} has {len(first)}")
        for n, (a, b) in enumerate(zip(first, entries), 1):
            if a.problem.question != b.problem.question:
                raise ConfigError(f"banks {stages[0].name!r} and {stage.name!r} differ at question {n}: "
                                  f"{a.problem.question[:60]!r} vs {b.problem.question[:60]!r}")


def simulate(stages: Sequence[StageBank], *, orders: int = 20, seed: int = 0,
             equivalence: Equivalence | None = None) -> Simulated:
    """Every model's k-vote for k = 1 .. the banks' samples per question, over ``orders`` random
    orders of each question's samples (orders independent across models)."""
    check_aligned(stages)
    if orders < 1:
        raise ConfigError("orders must be >= 1")
    eq = equivalence or Equivalence()
    k_max = min(s.bank.k for s in stages)
    if k_max < 1:
        raise ConfigError("every bank needs at least one sample per question")
    q_count = len(stages[0].bank.entries)
    shape = (len(stages), k_max, q_count, orders)
    right = np.zeros(shape, dtype=bool)
    usd = np.zeros(shape)
    conf = {kind: np.zeros(shape) for kind in CONFIDENCES}
    for s, stage in enumerate(stages):
        rng = np.random.default_rng([seed, s])
        placeholder = placeholder_in((stage.bank.meta.get("sampling") or {}).get("system_prompt"))
        for q, entry in enumerate(stage.bank.entries):
            pool = [_candidate(x, stage.name, placeholder) for x in entry.samples]
            gold = entry.problem.answer
            for o in range(orders):
                order = rng.permutation(len(pool))[:k_max]
                tokens = np.cumsum([pool[i].output_tokens for i in order])
                for k in range(1, k_max + 1):
                    t = tally([pool[i] for i in order[:k]], eq)
                    right[s, k - 1, q, o] = t.winner is not None and eq.same(t.winner, gold)
                    usd[s, k - 1, q, o] = float(stage.price.cost(entry.prompt_tokens, int(tokens[k - 1])))
                    for kind in CONFIDENCES:
                        conf[kind][s, k - 1, q, o] = confidence(t, kind)
    return Simulated(tuple(s.name for s in stages), right, usd, conf)


def _candidate(sample: BankSample, model: str, placeholder: str | None) -> Candidate:
    """The candidate a live run makes of this sample (its answer read again, as a run reads it)."""
    answer, raw, method = read_answer_for(sample.text, placeholder)
    return Candidate(sample.text, answer, raw, method, sample.finish_reason, sample.output_tokens,
                     sample.mean_logprob, model=model)


def expected(sim: Simulated, config: CascadeConfig, questions: Sequence[int] | None = None) -> Expected:
    """The configuration's accuracy, dollars and escalation share on ``questions`` (default all)."""
    qs = np.asarray(list(range(sim.questions)) if questions is None else list(questions), dtype=int)
    if not len(qs):
        raise ConfigError("no questions to evaluate on")
    _check(sim, config)
    first, k0 = config.models[0], config.samples[0]
    right = sim.right[first, k0 - 1][qs].astype(float)
    usd = sim.usd[first, k0 - 1][qs].copy()
    open_ = np.ones_like(right, dtype=bool)  # still at the current model
    escalated = np.zeros_like(open_)
    for i in range(1, len(config.models)):
        prev, k_prev = config.models[i - 1], config.samples[i - 1]
        up = open_ & (sim.confidence[config.confidence][prev, k_prev - 1][qs] < config.thresholds[i - 1])
        if i == 1:
            escalated = up
        m, k = config.models[i], config.samples[i]
        right = np.where(up, sim.right[m, k - 1][qs], right)
        usd = usd + np.where(up, sim.usd[m, k - 1][qs], 0.0)
        open_ = up
    share = float(escalated.mean())
    per_question = right.mean(axis=1)
    return Expected(config, float(per_question.mean()), float(usd.mean()), share,
                    tuple(float(x) for x in per_question))


def _check(sim: Simulated, config: CascadeConfig) -> None:
    if not config.models or len(config.samples) != len(config.models) or \
            len(config.thresholds) != len(config.models) - 1:
        raise ConfigError(f"a configuration needs a sample count per model and a threshold between models: {config}")
    if any(not 0 <= m < len(sim.names) for m in config.models):
        raise ConfigError(f"model index out of range in {config}")
    if any(not 1 <= k <= sim.k for k in config.samples):
        raise ConfigError(f"sample counts must lie in 1..{sim.k}: {config.samples}")
    if config.confidence not in sim.confidence:
        raise ConfigError(f"unknown confidence {config.confidence!r}")


def threshold_grid(values: np.ndarray, most: int = 24) -> list[float]:
    """Thresholds worth trying for these confidences: 0 (never escalate), the midpoints between
    neighbouring distinct values (at most ``most``, at quantiles), and 1 (all but the unanimous).
    Midpoints, not the values themselves, so that a held-out confidence equal to a boundary is
    not decided by where the development fold happened to fall."""
    distinct = np.unique(values)
    if len(distinct) > most + 1:
        distinct = np.unique(np.quantile(distinct, np.linspace(0, 1, most + 1)))
    mids = (distinct[:-1] + distinct[1:]) / 2
    return sorted({0.0, 1.0, *(float(round(m, 9)) for m in mids)})


def configurations(sim: Simulated, models: Sequence[int], ks: Sequence[int], *,
                   confidences: Sequence[str] = CONFIDENCES,
                   questions: Sequence[int] | None = None) -> Iterable[CascadeConfig]:
    """Every cascade over ``models`` in order with sample counts from ``ks`` and thresholds from
    the confidences seen on ``questions`` (one model: just its sample counts)."""
    ks = [k for k in ks if 1 <= k <= sim.k]
    if len(models) == 1:
        for k in ks:
            yield CascadeConfig((models[0],), (k,))
        return
    qs = list(range(sim.questions)) if questions is None else list(questions)
    for kind in confidences:
        for samples in itertools.product(ks, repeat=len(models)):
            grids = [threshold_grid(sim.confidence[kind][models[i], samples[i] - 1][qs])
                     for i in range(len(models) - 1)]
            for thresholds in itertools.product(*grids):
                yield CascadeConfig(tuple(models), samples, thresholds, kind)


def choose(sim: Simulated, candidates: Iterable[CascadeConfig], questions: Sequence[int] | None = None, *,
           budget: float | None = None, weight: float | None = None) -> Expected | None:
    """The candidate with the best accuracy at or under ``budget`` dollars per question, or the
    best accuracy - ``weight`` * dollars; ties go to the cheaper, then to the first. None where
    nothing fits the budget."""
    if (budget is None) == (weight is None):
        raise ConfigError("choose by a dollar budget or by a utility weight, one of the two")
    best: Expected | None = None
    best_key: tuple[float, float] | None = None
    for config in candidates:
        e = expected(sim, config, questions)
        if budget is not None and e.usd > budget * (1 + 1e-9):
            continue
        key = (e.accuracy if weight is None else e.accuracy - weight * e.usd, -e.usd)
        if best_key is None or key[0] > best_key[0] + _TOLERANCE or (
                abs(key[0] - best_key[0]) <= _TOLERANCE and key[1] > best_key[1] + _TOLERANCE):
            best, best_key = e, key
    return best


@dataclass(frozen=True, slots=True)
class Fold:
    """A configuration chosen on ``dev`` and its expected figures on ``test`` (never seen by the choice)."""

    test: tuple[int, ...]
    dev: tuple[int, ...]
    chosen: Expected | None
    """As measured on the development questions."""
    held_out: Expected | None


def folds_of(questions: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two halves, alternating, so both see the whole range of a bank ordered by anything."""
    return tuple(range(0, questions, 2)), tuple(range(1, questions, 2))


def cross_fit(sim: Simulated, models: Sequence[int], ks: Sequence[int], *, budget: float | None = None,
              weight: float | None = None, confidences: Sequence[str] = CONFIDENCES) -> list[Fold]:
    """Choose on each half, score on the other (the module docstring)."""
    a, b = folds_of(sim.questions)
    out = []
    for test, dev in ((a, b), (b, a)):
        chosen = choose(sim, configurations(sim, models, ks, confidences=confidences, questions=dev), dev,
                        budget=budget, weight=weight)
        out.append(Fold(test, dev, chosen, expected(sim, chosen.config, test) if chosen is not None else None))
    return out


def best_single(sim: Simulated, ks: Sequence[int], questions: Sequence[int] | None = None, *,
                budget: float) -> Expected | None:
    """The model and sample count with the best accuracy at or under ``budget`` dollars per question."""
    candidates = [c for m in range(len(sim.names)) for c in configurations(sim, [m], ks)]
    return choose(sim, candidates, questions, budget=budget)


@dataclass(frozen=True, slots=True)
class Point:
    """A model at k samples: its expected accuracy and dollars per question."""

    model: str
    k: int
    accuracy: float
    usd: float


def points_from_laws(laws: Mapping[str, ScalingLaw], costs: Mapping[str, ModelCost],
                     ks: Sequence[int]) -> list[Point]:
    """Expected accuracy per (model, k) from each model's fitted law P(k) = a k^b + c (samples as
    the spend), priced by its cost table."""
    missing = sorted(set(laws) - set(costs))
    if missing:
        raise ConfigError(f"no cost for model(s) {', '.join(missing)}")
    return [Point(m, k, min(1.0, max(0.0, law.value(k))), costs[m].usd(k)) for m, law in laws.items() for k in ks]


def best_under(points: Sequence[Point], budget: float) -> Point | None:
    """The best accuracy at or under ``budget`` dollars per question (ties to the cheaper)."""
    fitting = [p for p in points if p.usd <= budget * (1 + 1e-9) and math.isfinite(p.accuracy)]
    return max(fitting, key=lambda p: (p.accuracy, -p.usd), default=None)
