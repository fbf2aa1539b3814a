"""Algorithms by name, for the CLI, the server and the benchmark harness.

A factory takes the sampling options and the ``Components`` an algorithm may need (an outcome
scorer, a stopping rule, a process scorer, a step-wise search's settings); each uses what it
needs and refuses what it cannot use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, Algorithm, SamplingOptions
from apportion.algorithms.beam_search import BeamSearch
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.budget_forcing import BudgetForcing, BudgetForcingOptions
from apportion.algorithms.debate import Debate, DebateOptions
from apportion.algorithms.dvts import DVTS
from apportion.algorithms.particle_filtering import (
    ParticleFiltering,
    ParticleFilteringOptions,
    ParticleGibbs,
    ParticleGibbsOptions,
)
from apportion.algorithms.planning import Planning
from apportion.algorithms.program_aided import PROGRAM_SYSTEM_PROMPT, ProgramAided, ProgramAidedOptions
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.settings import configure
from apportion.algorithms.steps import STEP_SYSTEM_PROMPT, SearchOptions
from apportion.algorithms.stopping import StopRule
from apportion.algorithms.tree_of_thoughts import TreeOfThoughts, TreeOfThoughtsOptions
from apportion.algorithms.value_tree_search import ValueTreeSearch, ValueTreeSearchOptions
from apportion.answers.freeform import check_answer_mode
from apportion.errors import ConfigError
from apportion.reward.base import OutcomeScorer
from apportion.reward.process import ProcessScorer


@dataclass(frozen=True, slots=True)
class Components:
    """What an algorithm may be built with beside its sampling options."""

    scorer: OutcomeScorer | None = None
    """The outcome scorer (best-of-N)."""
    stopping: StopRule | None = None
    process_scorer: ProcessScorer | None = None
    """The process scorer (step-wise searches)."""
    search: SearchOptions | None = None
    """Step splitting, width, M, aggregation and vote of a step-wise search (its sampling is replaced)."""


Factory = Callable[[SamplingOptions, Components], Algorithm]
def _self_consistency(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return SelfConsistency(SelfConsistencyOptions(sampling, parts.stopping))


# "No-think": the answer alone, no working. Cheap enough to probe every prompt with, and right on
# the questions a model knows by heart; a batch routes the rest to reasoning (allocate.policies).
DIRECT_SYSTEM_PROMPT = "Give only the final answer, as 'The answer is N'."
DIRECT_MAX_TOKENS = 24


def _direct(sampling: SamplingOptions, parts: Components) -> Algorithm:
    direct = replace(sampling, system_prompt=DIRECT_SYSTEM_PROMPT, prompt_mode=None,
                     max_tokens=min(sampling.max_tokens, DIRECT_MAX_TOKENS), min_tokens=min(sampling.min_tokens, 4))
    return SelfConsistency(SelfConsistencyOptions(direct, parts.stopping))


def _best_of_n(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, stopping=parts.stopping), scorer=parts.scorer)


def _weighted_best_of_n(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return BestOfN(BestOfNOptions(sampling, weighted=True, stopping=parts.stopping), scorer=parts.scorer)


def _budget_forcing(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return _forcing(BudgetForcingOptions(), sampling, parts.stopping)


def _forcing(options: BudgetForcingOptions, sampling: SamplingOptions, stopping: StopRule | None) -> Algorithm:
    if stopping is not None:
        raise ConfigError("budget forcing takes no stopping rule: it sizes one solution's thinking, not a vote")
    return BudgetForcing(replace(options, sampling=sampling))


def _program_aided(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return _programs(ProgramAidedOptions(), sampling, parts.stopping)


def _programs(options: ProgramAidedOptions, sampling: SamplingOptions, stopping: StopRule | None) -> Algorithm:
    # The shared default asks for "The answer is N"; programs need their own instruction, unless
    # the caller chose a system prompt.
    if sampling.system_prompt == DEFAULT_SYSTEM_PROMPT:
        sampling = replace(sampling, system_prompt=PROGRAM_SYSTEM_PROMPT)
    return ProgramAided(replace(options, sampling=sampling, stopping=stopping))


def _beam_search(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return BeamSearch(_search_options(sampling, parts), process_scorer=parts.process_scorer)


def _dvts(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return DVTS(_search_options(sampling, parts), process_scorer=parts.process_scorer)


def _particle_filtering(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return ParticleFiltering(ParticleFilteringOptions.from_search(_search_options(sampling, parts)),
                             process_scorer=parts.process_scorer)


def _particle_gibbs(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return ParticleGibbs(ParticleGibbsOptions.from_search(_search_options(sampling, parts)),
                         process_scorer=parts.process_scorer)


def _value_tree_search(sampling: SamplingOptions, parts: Components) -> Algorithm:
    return ValueTreeSearch(ValueTreeSearchOptions.from_search(_search_options(sampling, parts)),
                           process_scorer=parts.process_scorer)


def _tree_of_thoughts(sampling: SamplingOptions, parts: Components) -> Algorithm:
    search = _search_options(sampling, parts)
    # Without search settings k keeps ToT's own default rather than the searches' M.
    options = (TreeOfThoughtsOptions.from_search(search) if parts.search is not None
               else TreeOfThoughtsOptions(sampling=search.sampling))
    return TreeOfThoughts(options, process_scorer=parts.process_scorer)


def _debate(sampling: SamplingOptions, parts: Components) -> Algorithm:
    if parts.stopping is not None:
        raise ConfigError("debate takes no stopping rule: its rounds and the budget end it")
    return Debate(DebateOptions(sampling=sampling))


def _search_options(sampling: SamplingOptions, parts: Components) -> SearchOptions:
    """``parts.search`` (or the defaults) with ``sampling``.
    The process scorer is checked when the search runs, so that a name can be validated without one."""
    if parts.stopping is not None:
        raise ConfigError("a step-wise search takes no stopping rule: its width and the budget end it")
    if sampling.system_prompt == DEFAULT_SYSTEM_PROMPT:  # as for programs: steps need asking for
        sampling = replace(sampling, system_prompt=STEP_SYSTEM_PROMPT)
    return replace(parts.search or SearchOptions(), sampling=sampling)


ALGORITHMS: dict[str, Factory] = {
    "self-consistency": _self_consistency,
    "direct": _direct,
    "best-of-n": _best_of_n,
    "weighted-best-of-n": _weighted_best_of_n,
    "budget-forcing": _budget_forcing,
    "program-aided": _program_aided,
    "beam-search": _beam_search,
    "dvts": _dvts,
    "particle-filtering": _particle_filtering,
    "particle-gibbs": _particle_gibbs,
    "value-tree-search": _value_tree_search,
    "tree-of-thoughts": _tree_of_thoughts,
    "debate": _debate,
    "planning": lambda sampling, parts: Planning(_self_consistency(sampling, parts)),
}
SEARCHES = ("beam-search", "dvts", "particle-filtering", "particle-gibbs", "value-tree-search", "tree-of-thoughts")
"""The step-wise searches: they take a process scorer and ``search`` settings."""
NEEDS_PROCESS_SCORER = ("beam-search", "dvts", "particle-filtering", "particle-gibbs", "value-tree-search")
"""The searches that cannot run without a process scorer (ToT values its states itself without one)."""
PLANNING = "planning"
"""``planning/<base>`` plans approaches and spends each one's share with the base (default
self-consistency): ``planning/beam-search``, ``planning/debate``..."""
_ALIASES = {"sc": "self-consistency", "majority": "self-consistency", "bon": "best-of-n",
            "weighted-bon": "weighted-best-of-n", "wbon": "weighted-best-of-n", "s1": "budget-forcing",
            "forcing": "budget-forcing", "pal": "program-aided", "programs": "program-aided",
            "beam": "beam-search", "pf": "particle-filtering", "pg": "particle-gibbs", "tot": "tree-of-thoughts",
            "mad": "debate", "vts": "value-tree-search", "plan": "planning"}


def needs_process_scorer(algorithm: Algorithm) -> bool:
    """Whether ``algorithm`` (or the base a planning run spends its budget with) cannot run without one."""
    base = algorithm.base if isinstance(algorithm, Planning) else algorithm
    return base.name in NEEDS_PROCESS_SCORER


def takes_process_scorer(name: str) -> bool:
    """Whether the algorithm called ``name`` (a planning run: its base) takes a process scorer and search settings."""
    head, _, base = canonical(name).partition("/")
    return (base or head) in SEARCHES


def canonical(name: str) -> str:
    """The registry's name for ``name`` (aliases resolved; ``planning/<base>`` keeps its base's)."""
    head, slash, base = name.strip().lower().partition("/")
    head = _ALIASES.get(head, head)
    return f"{head}/{_ALIASES.get(base, base)}" if slash else head


def make_algorithm(name: str, sampling: SamplingOptions | None = None,
                   scorer: OutcomeScorer | None = None, stopping: StopRule | None = None, *,
                   forcing: BudgetForcingOptions | None = None,
                   programs: ProgramAidedOptions | None = None,
                   process_scorer: ProcessScorer | None = None,
                   search: SearchOptions | None = None,
                   settings: Mapping[str, str] | None = None) -> Algorithm:
    """The algorithm called ``name``; ``forcing`` sets budget forcing's thinking limits and
    markers, ``programs`` program-aided's sandbox limits, ``search`` a step-wise search's settings
    (the ``sampling`` of each is replaced by ``sampling``); ``process_scorer`` guides a step-wise
    search (those of ``NEEDS_PROCESS_SCORER`` refuse to run without one); ``settings`` set the
    algorithm's own scalar options by name from text (``settings.configure``: ``--set KEY=VALUE``)."""
    algorithm = _make(name, sampling, scorer, stopping, forcing, programs, process_scorer, search)
    check_answer_mode(algorithm)  # free-form answers with an algorithm that reads answers its own way: now, not mid-run
    if settings:
        options = getattr(algorithm, "options", None)
        if options is None:
            raise ConfigError(f"{algorithm.name} has no settings")
        algorithm.options = configure(options, settings, owner=algorithm.name)  # type: ignore[attr-defined]
    return algorithm


def _make(name: str, sampling: SamplingOptions | None, scorer: OutcomeScorer | None, stopping: StopRule | None,
          forcing: BudgetForcingOptions | None, programs: ProgramAidedOptions | None,
          process_scorer: ProcessScorer | None, search: SearchOptions | None) -> Algorithm:
    key = canonical(name)
    head, slash, base = key.partition("/")
    if slash:
        if head != PLANNING or not base or base.startswith(PLANNING):
            raise ConfigError(f"{name!r}: only planning takes a base algorithm (planning/<base>, e.g. "
                              "planning/beam-search), and the base cannot be planning")
        return Planning(_make(base, sampling, scorer, stopping, forcing, programs, process_scorer, search))
    factory = ALGORITHMS.get(key)
    if factory is None:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    if (process_scorer is not None or search is not None) and key not in SEARCHES:
        raise ConfigError(f"a process scorer and step-search settings go with the step-wise searches "
                          f"({', '.join(SEARCHES)}), not {key}")
    if forcing is not None:
        if key != "budget-forcing":
            raise ConfigError(f"thinking-token limits and markers are budget forcing's settings, not {key}'s")
        return _forcing(forcing, sampling or SamplingOptions(), stopping)
    if programs is not None:
        if key != "program-aided":
            raise ConfigError(f"program time and memory limits are program-aided's settings, not {key}'s")
        return _programs(programs, sampling or SamplingOptions(), stopping)
    return factory(sampling or SamplingOptions(), Components(scorer, stopping, process_scorer, search))
