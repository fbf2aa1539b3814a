"""Allocation policies: how a total budget is shared among prompts, round by round.

- ``uniform``, ``front-load``, ``back-load``: the budget manager over a stream of queries. Prompts
  are served in file order, a window at a time; each gets ``factor`` times what is left divided by
  the prompts still to come (1, 2 and 0.5), and the last gets whatever is left. What a prompt does
  not spend flows to the later ones (remaining-budget bookkeeping).
- ``equal-samples``: the same number of samples for every prompt from one pooled budget (the
  baseline that isolates allocation: pooled like the policies below, split evenly).
- ``difficulty-bins``: a probe of a few samples per prompt, then Snell et al.'s bins of estimated
  difficulty, each with its own strategy (algorithm) and share of the rest.
- ``marginal-gain``: a probe, then greedy allocation (``allocate.greedy``) of the rest by expected
  accuracy gain per unit of cost, from each prompt's success curve (``allocate.difficulty``),
  re-planned after every round as the new samples change the curves.
- ``compute-optimal``: marginal-gain allocation with the strategy of each difficulty bin taken
  from a strategy table (chosen on a development set: ``apportion bench --policy``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from apportion.allocate.difficulty import AgreementEstimator, Estimator, Evidence, bins_of
from apportion.allocate.engine import Batch, Grant, Policy, PromptState
from apportion.allocate.greedy import allocate
from apportion.answers.equivalence import Equivalence
from apportion.errors import ConfigError


@dataclass(frozen=True, slots=True)
class BinStrategy:
    algorithm: str | None = None
    """The algorithm for prompts of this bin (None: the batch's algorithm)."""
    weight: float = 1.0
    """This bin's share of the budget per prompt, relative to the other bins (difficulty-bins)."""


@dataclass(frozen=True, slots=True)
class StrategyTable:
    """A strategy per difficulty bin, easiest first. ``edges`` are the inner bin edges on the
    estimated difficulty; empty: quantiles of the batch at hand."""

    bins: tuple[BinStrategy, ...]
    edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.bins:
            raise ConfigError("a strategy table needs at least one bin")
        if self.edges and len(self.edges) != len(self.bins) - 1:
            raise ConfigError(f"{len(self.bins)} bins need {len(self.bins) - 1} edges, got {len(self.edges)}")
        if list(self.edges) != sorted(self.edges):
            raise ConfigError("bin edges must be ascending")
        if any(not (b.weight >= 0 and math.isfinite(b.weight)) for b in self.bins):
            raise ConfigError("bin weights must be finite and >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"edges": list(self.edges),
                "bins": [{"algorithm": b.algorithm, "weight": b.weight} for b in self.bins]}

    @classmethod
    def from_dict(cls, data: Any) -> StrategyTable:
        if not isinstance(data, dict) or not isinstance(data.get("bins"), list):
            raise ConfigError('a strategy table is {"edges": [...], "bins": [{"algorithm": ..., "weight": ...}, ...]}')
        bins = []
        for b in data["bins"]:
            if not isinstance(b, dict) or set(b) - {"algorithm", "weight"}:
                raise ConfigError(f"a bin is {{'algorithm': name, 'weight': number}}, got {b!r}")
            bins.append(BinStrategy(b.get("algorithm"), float(b.get("weight", 1.0))))
        return cls(tuple(bins), tuple(float(e) for e in data.get("edges", [])))

    @classmethod
    def load(cls, path: str | Path) -> StrategyTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read strategy table {path}: {exc}") from exc


# Five bins of equal weight: without a table chosen on data, every bin gets the same share. An a
# priori Snell-like profile (0.5, 1, 1.5, 1.5, 0.5: little for the easiest and the hopeless) lost
# 2.6 points [1.2, 4.1] to equal samples on the Qwen MAWPS bank, so weights come from data or not at all.
DEFAULT_BINS = StrategyTable(tuple(BinStrategy(None, 1.0) for _ in range(5)))


@dataclass(frozen=True, slots=True)
class ThinkRoute:
    """Answer directly when easy, reason when hard: the probe draws direct answers (``algorithm``,
    a strategy that asks for the answer alone, on ``model`` if named), and a prompt whose
    ``agree`` or more direct answers all agree is done; the others get the batch's algorithm."""

    algorithm: str = "direct"
    model: str | None = None
    agree: int = 2
    keep_votes: bool = True
    """Whether the direct answers of a prompt routed to reasoning still vote there. Dropping them
    (False) measured no better on Qwen 0.5B (82.0% against 82.9% at 454 tokens per question,
    57.1 against 61.5 at 250): what hurts there is the routing itself."""

    def settled(self, evidence: Evidence) -> bool:
        return (evidence.samples >= self.agree and evidence.unanswered == 0 and len(evidence.counts) == 1)


@dataclass
class StreamShare(Policy):
    """The budget manager over a stream of queries (the module docstring)."""

    factor: float = 1.0
    window: int = 4
    name: str = "uniform"
    _next: int = 0

    def __post_init__(self) -> None:
        if not self.factor > 0 or self.window < 1:
            raise ConfigError("factor must be > 0 and window >= 1")

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "factor": self.factor, "window": self.window}

    def plan(self, batch: Batch) -> dict[int, Grant]:
        waiting = [p for p in batch.prompts if p.item.prompt is not None][self._next:]
        if not waiting:
            return {}
        rem, units = batch.remaining(), batch.planned_units()
        pending = dict.fromkeys(units, 0.0)
        grants = {}
        for left, state in zip(range(len(waiting), 0, -1), waiting[: self.window]):
            share = {}
            for unit in units:
                r = float(getattr(rem, unit)) - pending[unit]
                amount = r if left == 1 else min(r, self.factor * r / left)
                if unit == "generations":
                    amount = min(math.floor(r), math.floor(amount + 0.5))
                share[unit] = max(0.0, amount)
                pending[unit] += share[unit]
            grant = batch.with_share(state, share)
            if grant is not None:
                grants[state.index] = grant
            else:
                state.done = True
            self._next += 1
        return grants


@dataclass
class Probing(Policy):
    """What the difficulty-driven policies share: a probe round, estimates, bins, strategies."""

    probe: int = 2
    horizon: int = 32
    """The most samples any one prompt may get."""
    table: StrategyTable = field(default_factory=lambda: DEFAULT_BINS)
    estimator: Estimator = field(default_factory=AgreementEstimator)
    equivalence: Equivalence = field(default_factory=Equivalence)
    name: str = "probing"
    think: ThinkRoute | None = None
    """Think / no-think routing: probe with direct answers; a prompt they agree on is answered."""

    def __post_init__(self) -> None:
        if self.probe < 1 or self.horizon < self.probe:
            raise ConfigError(f"probe must be >= 1 and horizon >= probe, got {self.probe} and {self.horizon}")

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "probe": self.probe, "horizon": self.horizon,
                "estimator": self.estimator.name, "table": self.table.to_dict(),
                "think": None if self.think is None else {"probe_algorithm": self.think.algorithm,
                                                          "probe_model": self.think.model}}

    def probe_round(self, batch: Batch) -> dict[int, Grant]:
        """``probe`` samples each where the budget's expected cost allows, fewer (down to one
        each, then one for the first prompts) where it does not."""
        active = batch.active
        rem, k = batch.remaining(), self.probe
        for unit in batch.planned_units():
            need = sum(batch.sample_cost(p)[unit] for p in active)
            if need > 0:
                k = min(k, math.floor(float(getattr(rem, unit)) / need))
        if k >= 1:
            return {p.index: self._probe_grant(batch, p, k) for p in active}
        batch.notes.append("the budget is below one probe sample per prompt: the first prompts got one each")
        return _one_each_while_it_fits(batch, active, lambda p: self._probe_grant(batch, p, 1))

    def _probe_grant(self, batch: Batch, state: PromptState, k: int) -> Grant:
        grant = batch.with_samples(state, k)
        return grant if self.think is None else replace(grant, algorithm=self.think.algorithm, model=self.think.model)

    def estimate(self, batch: Batch) -> list[PromptState]:
        """Fresh estimates for every active prompt that has samples; bins fixed at the first call."""
        live = [p for p in batch.active if p.ledger is not None]
        for p in live:
            drawn = p.spent.generations
            p.estimate = self.estimator.estimate(Evidence.of(p.candidates, self.equivalence),
                                                 max(0, self.horizon - drawn))
            if drawn >= self.horizon:
                p.done = True
            elif self.think is not None and p.rounds == 1 and self.think.settled(p.estimate.evidence):
                p.done, p.routed = True, "direct"  # easy: the direct answers agree, no reasoning spent
        unbinned = [p for p in live if p.bin is None and p.estimate is not None]
        if unbinned and self.table.edges:
            for p, b in zip(unbinned, bins_of([p.estimate.difficulty for p in unbinned if p.estimate],
                                              self.table.edges)):
                p.bin = min(b, len(self.table.bins) - 1)
        elif unbinned:  # quantile bins of this batch, by rank: ties (common after a small probe) split evenly
            ranked = sorted(unbinned, key=lambda p: (p.estimate.difficulty if p.estimate else 0.0, p.index))
            for rank, p in enumerate(ranked):
                p.bin = rank * len(self.table.bins) // len(ranked)
        return [p for p in live if not p.done]

    def strategy(self, state: PromptState) -> str | None:
        return self.table.bins[state.bin].algorithm if state.bin is not None else None

    def grant(self, batch: Batch, state: PromptState, k: int) -> Grant:
        """``k`` more samples with the prompt's bin strategy; the first after a direct probe
        starts the vote afresh unless routing keeps the direct votes."""
        grant = batch.with_samples(state, k, self.strategy(state))
        if self.think is not None and not self.think.keep_votes and state.rounds == 1:
            grant = replace(grant, fresh=True)
        return grant


@dataclass
class MarginalGain(Probing):
    """Greedy by expected gain per unit of cost, re-planned every round; at most ``step`` more
    samples per prompt per round, so new evidence can redirect the rest."""

    step: int = 4
    lookahead: int = 2
    name: str = "marginal-gain"

    def plan(self, batch: Batch) -> dict[int, Grant]:
        if batch.round == 0:
            return self.probe_round(batch)
        live = self.estimate(batch)
        rem, units = batch.remaining(), batch.planned_units()
        if not live or any(float(getattr(rem, u)) <= 0 for u in units):
            return {}
        if units:
            # one budget of 1: a sample costs its largest fraction of what is left in any unit; one that
            # costs nothing in every unit (a bank without token counts) still costs a little, so the
            # greedy's gain per cost stays finite
            costs = [max([batch.sample_cost(p)[u] / float(getattr(rem, u)) for u in units] + [1e-9]) for p in live]
            budget = 1.0
        else:  # only a deadline binds: a round of at most ``step`` samples each, the deadline ends it
            costs, budget = [1.0] * len(live), float(len(live) * self.step)
        plan = allocate([p.estimate for p in live if p.estimate], costs, budget, lookahead=self.lookahead,
                        maximum=self.horizon)
        return {p.index: self.grant(batch, p, min(k, self.step)) for p, k in zip(live, plan.samples) if k > 0}


@dataclass
class ComputeOptimal(MarginalGain):
    """Marginal-gain allocation with a strategy per difficulty bin (``table``; without one, the
    batch's algorithm everywhere, which is marginal-gain)."""

    name: str = "compute-optimal"


@dataclass
class DifficultyBins(Probing):
    """A probe, then each prompt ``weight`` of its bin times an even share of the rest: as many
    as the expected costs allow, re-planned each round; when no whole share is left, one more
    each, the prompts furthest below their share first, while they fit."""

    name: str = "difficulty-bins"

    def plan(self, batch: Batch) -> dict[int, Grant]:
        if batch.round == 0:
            return self.probe_round(batch)
        live = self.estimate(batch)
        rem, units = batch.remaining(), batch.planned_units()
        weights = {p.index: self.table.bins[p.bin or 0].weight for p in live}
        live = [p for p in live if weights[p.index] > 0 and p.spent.generations < self.horizon]
        if not live or not units:
            return {}
        costs = {p.index: batch.sample_cost(p) for p in live}
        x = min(float(getattr(rem, u)) / max(1e-12, sum(weights[p.index] * costs[p.index][u] for p in live))
                for u in units)
        grants = {p.index: self.grant(batch, p, math.floor(weights[p.index] * x))
                  for p in live if math.floor(weights[p.index] * x) >= 1}
        if grants:
            return grants
        behind = sorted(live, key=lambda p: (p.spent.generations / weights[p.index], p.index))
        return _one_each_while_it_fits(batch, behind, lambda p: self.grant(batch, p, 1))


@dataclass
class EqualSamples(DifficultyBins):
    """Every prompt the same number of samples (give or take one) from one pooled budget: the
    fair baseline for allocation, pooled as the allocating policies pool it, split evenly."""

    name: str = "equal-samples"


def _one_each_while_it_fits(batch: Batch, prompts: list[PromptState],
                            grant: Callable[[PromptState], Grant]) -> dict[int, Grant]:
    """One more sample for each of ``prompts``, in their order, while the expected costs of those
    granted so far fit what the parent has left in every planned unit."""
    rem, units = batch.remaining(), batch.planned_units()
    grants, spent = {}, dict.fromkeys(units, 0.0)
    for p in prompts:
        cost = batch.sample_cost(p)
        if any(spent[u] + cost[u] > float(getattr(rem, u)) for u in units):
            break
        for u in units:
            spent[u] += cost[u]
        grants[p.index] = grant(p)
    return grants


POLICIES = ("uniform", "front-load", "back-load", "equal-samples", "difficulty-bins", "marginal-gain",
            "compute-optimal")


def make_policy(name: str, *, window: int = 4, probe: int = 2, horizon: int = 32, step: int = 4,
                table: StrategyTable | None = None, equivalence: Equivalence | None = None,
                estimator: Estimator | None = None, think: ThinkRoute | None = None) -> Policy:
    """The policy called ``name`` (one of POLICIES); ``think`` routes the probing policies."""
    eq = equivalence or Equivalence()
    est = estimator or AgreementEstimator()
    if name in ("uniform", "front-load", "back-load"):
        if think is not None:
            raise ConfigError(f"think / no-think routing needs a probe, which {name} does not take")
        return StreamShare({"uniform": 1.0, "front-load": 2.0, "back-load": 0.5}[name], window, name)
    if name == "equal-samples":
        return EqualSamples(probe, horizon, _one_bin(table), est, eq, think=think)
    if name == "difficulty-bins":
        return DifficultyBins(probe, horizon, table or DEFAULT_BINS, est, eq, think=think)
    if name == "marginal-gain":
        return MarginalGain(probe, horizon, _one_bin(table), est, eq, think=think, step=step)
    if name == "compute-optimal":
        return ComputeOptimal(probe, horizon, table or _one_bin(None), est, eq, think=think, step=step)
    raise ConfigError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")


def _one_bin(table: StrategyTable | None) -> StrategyTable:
    """Marginal-gain keeps the bins only for its report: the table's edges, one strategy."""
    return StrategyTable((BinStrategy(),) * len(table.bins), table.edges) if table else \
        StrategyTable((BinStrategy(),) * len(DEFAULT_BINS.bins))
