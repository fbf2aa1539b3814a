"""Prompt template and strategy chosen together (issue 9, seed 004), on banks of the same questions.

One bank per template (plain, TALE, Chain of Draft), drawn over the same questions. Every
(template, strategy) pair is replayed at the same mean budget per question: the samples are
shared out by ``equal-samples`` allocation (the same number for every question, as many as the
pooled budget allows), so in tokens a template with shorter answers gets more samples, which is
the trade the choice is about. The questions are split in two folds (even and odd positions, as
``bench.allocation`` splits them); each fold's pair is chosen on the other fold and reported on
its own, so no question's outcome picks its own pair. Beside the joint choice, chosen the same
way: (a) the plain template with its best strategy, (b) the best template under self-consistency,
(c) that template with the strategy chosen on the plain template (each chosen alone), and plain
self-consistency, each paired with the joint choice over questions (bootstrap intervals).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.prompting import PROMPT_MODES, parse_prompt_mode
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.bench.allocation import SELECTORS, PolicyCell, ReplaySetup, replay_policy
from apportion.bench.replay import SCORERS, bank_prompt_mode, bank_sampling
from apportion.bench.stats import bootstrap_interval, paired_difference
from apportion.budget.units import Budget
from apportion.errors import ConfigError

POLICY = "equal-samples"
BASELINE_STRATEGY = "self-consistency"
Pair = tuple[str, str]
"""(template, strategy)."""


@dataclass(frozen=True, slots=True)
class JointSetup:
    banks: Mapping[str, SampleBank]
    """Template name (a prompt mode: plain, tale, cod) to its bank; the order breaks ties."""
    algorithms: tuple[str, ...]
    mean: Budget
    orders: int = 20
    seed: int = 0
    scorer: str = "self-certainty"
    probe: int = 2
    equivalence: Equivalence = field(default_factory=Equivalence)

    def __post_init__(self) -> None:
        check_banks(self.banks)
        if not self.algorithms:
            raise ConfigError("give at least one strategy")
        unknown = [a for a in self.algorithms if a not in SELECTORS]
        if unknown:
            raise ConfigError(f"cannot replay strategy {unknown[0]!r} on a bank; known: {', '.join(SELECTORS)}")
        if len(set(self.algorithms)) < len(self.algorithms):
            raise ConfigError(f"a strategy is given twice: {', '.join(self.algorithms)}")
        if self.orders < 1:
            raise ConfigError(f"orders must be >= 1, got {self.orders}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"unknown replay scorer {self.scorer!r}; known: {', '.join(SCORERS)}")
        if self.mean.seconds is not None:
            raise ConfigError("a replayed budget has no wall clock: give it in generations, tokens or dollars")
        smallest = min(b.k for b in self.banks.values())
        if self.mean.generations is not None and self.mean.generations > smallest:
            raise ConfigError(f"a mean of {self.mean.generations} samples per question exceeds the smallest "
                              f"bank's {smallest}")
        if self.probe > smallest:
            raise ConfigError(f"the probe of {self.probe} samples exceeds the smallest bank's {smallest}")

    @property
    def strategies(self) -> tuple[str, ...]:
        """The strategies searched: self-consistency always, since two baselines are chosen under it."""
        return tuple(dict.fromkeys([BASELINE_STRATEGY, *self.algorithms]))

    @property
    def baseline_template(self) -> str:
        return "plain" if "plain" in self.banks else next(iter(self.banks))


def check_banks(banks: Mapping[str, SampleBank]) -> None:
    """Two templates or more, each name a prompt mode that matches its bank's record, and every
    bank over the same questions (ids, texts and gold answers) in the same order."""
    if len(banks) < 2:
        raise ConfigError(f"a joint choice needs banks of two templates or more, got {len(banks)} "
                          "(--bank plain=PATH --bank cod=PATH)")
    for name, bank in banks.items():
        mode = name.partition(":")[0]
        if mode not in PROMPT_MODES:
            raise ConfigError(f"unknown template {name!r}; known: {', '.join(PROMPT_MODES)}")
        parse_prompt_mode(name)
        recorded = bank_prompt_mode(bank.meta)
        if recorded.partition(":")[0] != mode:
            raise ConfigError(f"the bank given as {name!r} was drawn with the {recorded!r} prompt mode")
        if not bank.entries:
            raise ConfigError(f"the {name!r} bank holds no questions")
    first_name, first = next(iter(banks.items()))
    want = [(e.problem.id, e.problem.question, e.problem.answer) for e in first.entries]
    for name, bank in banks.items():
        have = [(e.problem.id, e.problem.question, e.problem.answer) for e in bank.entries]
        if have == want:
            continue
        if len(have) != len(want):
            raise ConfigError(f"the {name!r} bank holds {len(have)} questions, the {first_name!r} bank "
                              f"{len(want)}: the banks must be drawn over the same questions")
        at = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        raise ConfigError(f"the {name!r} and {first_name!r} banks differ at question {at + 1} "
                          f"(id {have[at][0]!r} against {want[at][0]!r}): the banks must be drawn over the "
                          "same questions in the same order")


def folds(questions: int) -> tuple[list[int], list[int]]:
    """The two folds of ``bench.allocation``'s cross-fitting: even and odd positions."""
    picked = list(range(questions))
    return picked[0::2], picked[1::2]


async def replay_pairs(setup: JointSetup) -> list[dict[Pair, PolicyCell]]:
    """Every (template, strategy) pair on each fold, its budget pooled over that fold's questions."""
    out: list[dict[Pair, PolicyCell]] = []
    for fold in folds(len(next(iter(setup.banks.values())).entries)):
        cells: dict[Pair, PolicyCell] = {}
        for template, bank in setup.banks.items():
            replay = ReplaySetup(bank, setup.mean, orders=setup.orders, seed=setup.seed, scorer=setup.scorer,
                                 sampling=bank_sampling(bank.meta, SamplingOptions()), probe=setup.probe,
                                 equivalence=setup.equivalence)
            for strategy in setup.strategies:
                cells[(template, strategy)] = await replay_policy(replay, POLICY, strategy, questions=fold)
        out.append(cells)
    return out


def best(cells: Mapping[Pair, PolicyCell], candidates: Sequence[Pair]) -> Pair:
    """The candidate most accurate on these cells; ties go to the first (the order given)."""
    return max(candidates, key=lambda pair: (cells[pair].accuracy, -candidates.index(pair)))


def choices(setup: JointSetup, dev: Mapping[Pair, PolicyCell]) -> dict[str, Pair]:
    """Each way of choosing, applied to the development fold's cells only."""
    templates, strategies = list(setup.banks), setup.strategies
    base = setup.baseline_template
    alone_template = best(dev, [(t, BASELINE_STRATEGY) for t in templates])[0]
    alone_strategy = best(dev, [(base, s) for s in strategies])[1]
    return {
        "joint": best(dev, [(t, s) for t in templates for s in strategies]),
        "baseline_template_best_strategy": (base, alone_strategy),
        "best_template_self_consistency": (alone_template, BASELINE_STRATEGY),
        "each_chosen_alone": (alone_template, alone_strategy),
        "baseline_self_consistency": (base, BASELINE_STRATEGY),
    }


CHOICES = {
    "joint": "joint: chosen together",
    "baseline_template_best_strategy": "(a) plain, its best strategy",
    "best_template_self_consistency": "(b) best template under SC",
    "each_chosen_alone": "(c) (b)'s template, (a)'s strategy",
    "baseline_self_consistency": "plain SC, nothing chosen",
}
"""Ways of choosing; "plain" stands for the baseline template (the first bank where none is plain)."""


async def compare_joint(setup: JointSetup) -> dict[str, Any]:
    """The report: every pair's figures per fold, what each way of choosing picked on each
    development fold, its held-out accuracy over all questions (each question scored by the pair
    chosen on the other fold) with a bootstrap interval, and its paired difference from the joint
    choice."""
    cells = await replay_pairs(setup)
    split = folds(len(next(iter(setup.banks.values())).entries))
    n = sum(len(f) for f in split)
    held: dict[str, list[float]] = {name: [0.0] * n for name in CHOICES}
    tokens: dict[str, float] = dict.fromkeys(CHOICES, 0.0)
    samples: dict[str, float] = dict.fromkeys(CHOICES, 0.0)
    picked: list[dict[str, Pair]] = []
    for test in (0, 1):
        chosen = choices(setup, cells[1 - test])  # the other fold's outcomes only
        picked.append(chosen)
        for name, pair in chosen.items():
            cell = cells[test][pair]
            for q, rate in zip(split[test], cell.per_question):
                held[name][q] = rate
            tokens[name] += cell.tokens * len(split[test]) / n
            samples[name] += cell.generations * len(split[test]) / n
    rows = []
    for name, label in CHOICES.items():
        low, high = bootstrap_interval(held[name], seed=setup.seed)
        diff = paired_difference(held["joint"], held[name])
        rows.append({"choice": name, "label": label, "pairs": [list(p[name]) for p in picked],
                     "accuracy": statistics.fmean(held[name]), "interval": [low, high],
                     "tokens_per_question": tokens[name], "samples_per_question": samples[name],
                     "joint_minus_this": list(diff), "per_question": held[name]})
    return {"policy": POLICY, "budget_per_question": setup.mean.to_dict(), "orders": setup.orders,
            "seed": setup.seed, "scorer": setup.scorer, "probe": setup.probe, "questions": n,
            "folds": [f"{len(split[0])} questions at even positions", f"{len(split[1])} at odd positions"],
            "baseline_template": setup.baseline_template, "strategies": list(setup.strategies),
            "banks": {t: _bank_summary(b) for t, b in setup.banks.items()},
            "pairs": _pair_rows(cells, split, n, setup.banks), "choices": rows}


def _bank_summary(bank: SampleBank) -> dict[str, Any]:
    recorded = bank.meta.get("sampling")
    sampling: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    return {"prompt_mode": bank_prompt_mode(bank.meta), "model": bank.meta.get("model"),
            "dataset": bank.meta.get("dataset"), "samples_per_question": bank.k,
            "max_tokens": sampling.get("max_tokens"), "system_prompt": sampling.get("system_prompt"),
            "mean_output_tokens": statistics.fmean(s.output_tokens for e in bank.entries for s in e.samples)}


def _pair_rows(cells: list[dict[Pair, PolicyCell]], split: tuple[list[int], list[int]], n: int,
               banks: Mapping[str, SampleBank]) -> list[dict[str, Any]]:
    """Each pair over all questions (in sample: no choice is made here) and on each fold. A pair
    that drew every sample its bank holds (``capped``) may have left budget unspent: its bank, not
    the budget, bound it."""
    rows = []
    for pair in cells[0]:
        per_question = [0.0] * n
        for fold, questions in zip(cells, split):
            for q, rate in zip(questions, fold[pair].per_question):
                per_question[q] = rate
        low, high = bootstrap_interval(per_question)
        samples = sum(f[pair].generations * len(q) for f, q in zip(cells, split)) / n
        rows.append({"template": pair[0], "strategy": pair[1], "accuracy": statistics.fmean(per_question),
                     "interval": [low, high],
                     "fold_accuracy": [fold[pair].accuracy for fold in cells],
                     "tokens_per_question": sum(f[pair].tokens * len(q) for f, q in zip(cells, split)) / n,
                     "samples_per_question": samples, "capped": samples >= banks[pair[0]].k - 1e-9})
    return rows
