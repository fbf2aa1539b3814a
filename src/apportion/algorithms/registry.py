"""Algorithms by name, for the CLI, the server and the benchmark harness."""

from __future__ import annotations

from collections.abc import Callable

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.stopping import StopRule
from apportion.errors import ConfigError
from apportion.reward.base import OutcomeScorer

Factory = Callable[[SamplingOptions, OutcomeScorer | None, StopRule | None], Algorithm]


def _self_consistency(sampling: SamplingOptions, scorer: OutcomeScorer | None, stopping: StopRule | None) -> Algorithm:
    return SelfConsistency(SelfConsistencyOptions(sampling, stopping))


def _best_of_n(sampling: SamplingOptions, scorer: OutcomeScorer | None, stopping: StopRule | None) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, stopping=stopping), scorer=scorer)


def _weighted_best_of_n(sampling: SamplingOptions, scorer: OutcomeScorer | None,
                        stopping: StopRule | None) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, weighted=True, stopping=stopping), scorer=scorer)


ALGORITHMS: dict[str, Factory] = {
    "self-consistency": _self_consistency,
    "best-of-n": _best_of_n,
    "weighted-best-of-n": _weighted_best_of_n,
}
_ALIASES = {"sc": "self-consistency", "majority": "self-consistency", "bon": "best-of-n",
            "weighted-bon": "weighted-best-of-n", "wbon": "weighted-best-of-n"}


def make_algorithm(name: str, sampling: SamplingOptions | None = None,
                   scorer: OutcomeScorer | None = None, stopping: StopRule | None = None) -> Algorithm:
    key = _ALIASES.get(name.lower(), name.lower())
    factory = ALGORITHMS.get(key)
    if factory is None:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return factory(sampling or SamplingOptions(), scorer, stopping)
