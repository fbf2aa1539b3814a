"""Confidence intervals for accuracy over a set of questions.

Live runs give one right-or-wrong per question: the Wilson score interval, which stays inside
[0, 1] and behaves at accuracies near 0 or 1 where the normal approximation does not. Replay
gives each question a rate (right in this fraction of the orders): the normal interval of the
mean of those rates over questions. Both describe sampling of *questions*; the spread over replay
orders is reported beside them, not folded in.

Policies, cascades and prompt x strategy pairs are compared on the same questions: a percentile
bootstrap over questions (``bootstrap_interval``) and the paired difference of two per-question
series (``paired_difference``).

Also here: the Anytime Index of a curve of accuracy against budget (``anytime_index``).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence

import numpy as np

from apportion.errors import ConfigError

Z95 = 1.959963984540054


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Interval for the mean of per-question rates in [0, 1]; Wilson's when every rate is 0 or 1
    (then they are plain right-or-wrong outcomes and the normal interval would be too narrow)."""
    n = len(values)
    if n == 0:
        return (0.0, 1.0)
    if all(v in (0.0, 1.0) for v in values):
        return wilson(sum(values), n, z)
    mean = statistics.fmean(values)
    half = z * statistics.stdev(values) / math.sqrt(n) if n > 1 else 1.0
    return (max(0.0, mean - half), min(1.0, mean + half))


def anytime_index(points: Sequence[tuple[float, float]]) -> float | None:
    """The Anytime Index of seed 001: AI = (1/|B|) * sum over budget increments of dQ(b)/db.

    ``points`` are (budget, quality) in order of increasing budget, the budget in generations or
    in tokens; each pair of neighbours is one increment, and AI is the mean of their slopes (the
    unweighted mean, as the seed defines it: a curve that gains early scores higher than one that
    gains the same late, on a grid of doubling budgets). None where it is undefined: fewer than two
    points, or a budget that does not grow (a bank without token counts spends 0 tokens at every
    budget).
    """
    if len(points) < 2:
        return None
    slopes = []
    for (b0, q0), (b1, q1) in itertools.pairwise(points):
        if not (math.isfinite(b0) and math.isfinite(b1) and b1 > b0):
            return None
        slopes.append((q1 - q0) / (b1 - b0))
    return statistics.fmean(slopes)


def bootstrap_interval(values: Sequence[float], *, draws: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling questions)."""
    if not values:
        return (float("nan"), float("nan"))
    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(draws, len(arr)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of a - b over the same questions, with its bootstrap interval."""
    if len(a) != len(b):
        raise ConfigError("a paired comparison needs the same questions on both sides")
    diff = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(diff)
    return statistics.fmean(diff), low, high
