"""Greedy marginal-gain allocation: the next sample goes to the prompt whose expected accuracy
rises most per unit of cost.

Each prompt has a success model, P_i(k): the chance its answer is right after k samples. With
costs c_i per sample and a total budget B, the allocator maximises sum_i P_i(k_i) subject to
sum_i c_i k_i <= B by repeatedly buying the sample with the largest gain per cost,
(P_i(k_i + 1) - P_i(k_i)) / c_i, that still fits.

Why greedy: when every P_i is concave in k (each extra sample adds no more than the one before)
and every sample costs the same, the marginal gains of all prompts, taken together, form one
list sorted within each prompt; any allocation of n samples collects n of those gains with each
prompt's taken from its front, and the n largest are such a set, which greedy takes. With
unequal costs the problem is a knapsack, and greedy by gain per cost is within one sample's gain
of the optimum (the classic fractional bound). When P_i is not concave (a hard question whose
majority only turns right after many samples, an S-shaped curve), greedy can starve it: a first
sample gains nothing, so it is never bought. ``lookahead`` buys a run of samples at the best
average gain per cost over the next ``lookahead`` samples, which crosses such flat stretches.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from apportion.allocate.scaling import ScalingLaw
from apportion.errors import ConfigError


class SuccessModel(Protocol):
    def value(self, k: int) -> float:
        """P(right) after ``k`` samples; value(0) is the chance without any (0 for most tasks)."""
        ...


@dataclass(frozen=True, slots=True)
class PassAtK:
    """A verifiable task: right once any sample is right, each with probability ``p``."""

    p: float

    def value(self, k: int) -> float:
        return 1 - (1 - self.p) ** k


@dataclass(frozen=True, slots=True)
class LawModel:
    """A fitted scaling law (``allocate.scaling``) as a success model, 0 before the first sample."""

    law: ScalingLaw

    def value(self, k: int) -> float:
        return 0.0 if k <= 0 else min(1.0, max(0.0, self.law.value(k)))


@dataclass(frozen=True, slots=True)
class Allocation:
    samples: tuple[int, ...]
    spent: float
    expected: float
    """Sum over prompts of the success model at its allocation."""


def allocate(models: Sequence[SuccessModel], costs: Sequence[float], budget: float, *,
             minimum: int = 0, maximum: int | None = None, lookahead: int = 1) -> Allocation:
    """Samples per prompt under ``budget``: every prompt first gets ``minimum`` (refused when
    that alone does not fit), then greedy by gain per cost up to ``maximum`` each."""
    if len(models) != len(costs):
        raise ConfigError(f"{len(models)} success models for {len(costs)} costs")
    if any(not (c > 0 and math.isfinite(c)) for c in costs):
        raise ConfigError("every cost per sample must be positive and finite")
    if budget < 0 or minimum < 0 or lookahead < 1 or (maximum is not None and maximum < minimum):
        raise ConfigError("budget >= 0, minimum >= 0, lookahead >= 1 and maximum >= minimum are required")
    k = [minimum] * len(models)
    spent = minimum * math.fsum(costs)
    if spent > budget:
        raise ConfigError(f"the minimum of {minimum} sample(s) per prompt costs {spent:g}, over the budget {budget:g}")
    cap = maximum if maximum is not None else math.inf
    heap: list[tuple[float, int, int, int]] = []

    def offer(i: int) -> None:
        best: tuple[float, int] | None = None
        base = models[i].value(k[i])
        for step in range(1, lookahead + 1):
            if k[i] + step > cap:
                break
            rate = (models[i].value(k[i] + step) - base) / (step * costs[i])
            if best is None or rate > best[0] + 1e-15:
                best = (rate, step)
        if best is not None and best[0] > 0:
            heapq.heappush(heap, (-best[0], i, k[i], best[1]))

    for i in range(len(models)):
        offer(i)
    while heap:
        _, i, at, step = heapq.heappop(heap)
        if at != k[i]:
            continue  # stale: this prompt was bought since
        price = step * costs[i]
        if spent + price > budget * (1 + 1e-12):
            # the run does not fit; a single sample of it may (lookahead > 1)
            gain = models[i].value(k[i] + 1) - models[i].value(k[i])
            if step > 1 and gain > 0 and spent + costs[i] <= budget * (1 + 1e-12):
                heapq.heappush(heap, (-gain / costs[i], i, k[i], 1))
            continue
        k[i] += step
        spent += price
        offer(i)
    return Allocation(tuple(k), spent, math.fsum(m.value(n) for m, n in zip(models, k)))
