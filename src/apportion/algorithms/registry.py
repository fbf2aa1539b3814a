"""Algorithms by name, for the CLI, the server and the benchmark harness."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, Algorithm, SamplingOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.budget_forcing import BudgetForcing, BudgetForcingOptions
from apportion.algorithms.program_aided import PROGRAM_SYSTEM_PROMPT, ProgramAided, ProgramAidedOptions
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.stopping import StopRule
from apportion.errors import ConfigError
from apportion.reward.base import OutcomeScorer

Factory = Callable[[SamplingOptions, OutcomeScorer | None, StopRule | None], Algorithm]


def _self_consistency(sampling: SamplingOptions, scorer: OutcomeScorer | None, stopping: StopRule | None) -> Algorithm:
    return SelfConsistency(SelfConsistencyOptions(sampling, stopping))


# "No-think": the answer alone, no working. Cheap enough to probe every prompt with, and right on
# the questions a model knows by heart; a batch routes the rest to reasoning (allocate.policies).
DIRECT_SYSTEM_PROMPT = "Give only the final answer, as 'The answer is N'."
DIRECT_MAX_TOKENS = 24


def _direct(sampling: SamplingOptions, scorer: OutcomeScorer | None, stopping: StopRule | None) -> Algorithm:
    direct = replace(sampling, system_prompt=DIRECT_SYSTEM_PROMPT, prompt_mode=None,
                     max_tokens=min(sampling.max_tokens, DIRECT_MAX_TOKENS), min_tokens=min(sampling.min_tokens, 4))
    return SelfConsistency(SelfConsistencyOptions(direct, stopping))


def _best_of_n(sampling: SamplingOptions, scorer: OutcomeScorer | None, stopping: StopRule | None) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, stopping=stopping), scorer=scorer)


def _weighted_best_of_n(sampling: SamplingOptions, scorer: OutcomeScorer | None,
                        stopping: StopRule | None) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, weighted=True, stopping=stopping), scorer=scorer)


def _budget_forcing(sampling: SamplingOptions, scorer: OutcomeScorer | None,
                    stopping: StopRule | None) -> Algorithm:
    return _forcing(BudgetForcingOptions(), sampling, stopping)


def _forcing(options: BudgetForcingOptions, sampling: SamplingOptions, stopping: StopRule | None) -> Algorithm:
    if stopping is not None:
        raise ConfigError("budget forcing takes no stopping rule: it sizes one solution's thinking, not a vote")
    return BudgetForcing(replace(options, sampling=sampling))


def _program_aided(sampling: SamplingOptions, scorer: OutcomeScorer | None,
                   stopping: StopRule | None) -> Algorithm:
    return _programs(ProgramAidedOptions(), sampling, stopping)


def _programs(options: ProgramAidedOptions, sampling: SamplingOptions, stopping: StopRule | None) -> Algorithm:
    # The shared default asks for "The answer is N"; programs need their own instruction, unless
    # the caller chose a system prompt.
    if sampling.system_prompt == DEFAULT_SYSTEM_PROMPT:
        sampling = replace(sampling, system_prompt=PROGRAM_SYSTEM_PROMPT)
    return ProgramAided(replace(options, sampling=sampling, stopping=stopping))


ALGORITHMS: dict[str, Factory] = {
    "self-consistency": _self_consistency,
    "direct": _direct,
    "best-of-n": _best_of_n,
    "weighted-best-of-n": _weighted_best_of_n,
    "budget-forcing": _budget_forcing,
    "program-aided": _program_aided,
}
_ALIASES = {"sc": "self-consistency", "majority": "self-consistency", "bon": "best-of-n",
            "weighted-bon": "weighted-best-of-n", "wbon": "weighted-best-of-n", "s1": "budget-forcing",
            "forcing": "budget-forcing", "pal": "program-aided", "programs": "program-aided"}


def make_algorithm(name: str, sampling: SamplingOptions | None = None,
                   scorer: OutcomeScorer | None = None, stopping: StopRule | None = None, *,
                   forcing: BudgetForcingOptions | None = None,
                   programs: ProgramAidedOptions | None = None) -> Algorithm:
    """The algorithm called ``name``; ``forcing`` sets budget forcing's thinking limits and
    markers, ``programs`` program-aided's sandbox limits (the ``sampling`` of either is replaced
    by ``sampling``)."""
    key = _ALIASES.get(name.lower(), name.lower())
    factory = ALGORITHMS.get(key)
    if factory is None:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    if forcing is not None:
        if key != "budget-forcing":
            raise ConfigError(f"thinking-token limits and markers are budget forcing's settings, not {key}'s")
        return _forcing(forcing, sampling or SamplingOptions(), stopping)
    if programs is not None:
        if key != "program-aided":
            raise ConfigError(f"program time and memory limits are program-aided's settings, not {key}'s")
        return _programs(programs, sampling or SamplingOptions(), stopping)
    return factory(sampling or SamplingOptions(), scorer, stopping)
