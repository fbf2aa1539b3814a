"""Process rewards: a score in [0, 1] for every prefix of a solution's steps.

A step-wise search (beam search, DVTS, particle filtering, value tree search) holds paths: each is
the steps written so far, in order. After every search step it asks a ``ProcessScorer`` for the
scores of all live paths at once; ``result[i][k]`` rates ``paths[i][:k+1]``, so a search reads
the score of a path's newest step at ``result[i][-1]`` and can fold the others with
``aggregate``.

Scores of prefixes a scorer has already seen for the question come from its ``PrefixScoreCache``
and cost nothing: a path pays for its new steps only. Every scorer goes through ``score_paths``,
so caching (and the rules for what a failure leaves behind) is written once. Every call a scorer
makes is charged to ``lm.ledger`` as scoring (tokens, dollars and time; never generations).

Errors: ``BudgetExhausted`` when the ledger refuses every new prefix (nothing new was paid for);
``ProcessScoringFailed`` (a ``ScoringFailed``) carrying every score that was had when some calls
failed or were refused after others were paid for (``exhausted`` says the budget ran out).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from apportion.errors import BackendError, BudgetExhausted, ConfigError, ProcessScoringFailed
from apportion.lm.metered import MeteredLM

AGGREGATIONS = ("last", "min", "product", "mean")

Steps = tuple[str, ...]
"""A path's steps (or a prefix of them), in order: the cache's key beside the question."""

PrefixOutcome = float | None | BaseException
"""What scoring one new prefix gave: a score, None (a definite "no score": an unreadable verdict),
or the exception that stopped it (not cached: a later call may try again)."""


def aggregate(step_scores: Sequence[float | None], how: str = "last") -> float | None:
    """One path score from its per-step scores; None if any needed score is None (or no steps).
    ConfigError for an unknown `how`.

    "last": the newest step's score (the PRM's view of the whole prefix); "min": the weakest step;
    "product": the chance that every step is right, read as independent; "mean": the average."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if not step_scores:
        return None
    if how == "last":
        return step_scores[-1]
    if any(s is None for s in step_scores):
        return None
    values = [float(s) for s in step_scores if s is not None]
    if how == "min":
        return min(values)
    if how == "product":
        return math.prod(values)
    return math.fsum(values) / len(values)


@runtime_checkable
class ProcessScorer(Protocol):
    name: str

    async def score(self, lm: MeteredLM, question: str,
                    paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        """For each path (its steps so far, in order) one score in [0, 1] per step:
        result[i][k] rates steps[:k+1] of path i. All paths of one search step are scored in
        one call (batched where the scorer can). Prefixes already scored for this question come
        from a cache and cost nothing, so a path pays for its new steps only. Every call's cost
        goes to lm.ledger (charged as scoring). Raises ScoringFailed (see errors.py) carrying what
        was scored when calls fail; BudgetExhausted when the ledger refuses."""
        ...


class PrefixScoreCache:
    """Scores of step prefixes, keyed by (question, steps). A definite None (the scorer could not
    read a score and asking again would not change that) is kept too; failures are never kept.
    Least recently used entries go first past ``max_entries``."""

    def __init__(self, max_entries: int = 200_000) -> None:
        if max_entries < 1:
            raise ConfigError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._scores: OrderedDict[tuple[str, Steps], float | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._scores)

    def __contains__(self, key: tuple[str, Sequence[str]]) -> bool:
        question, steps = key
        return (question, tuple(steps)) in self._scores

    def lookup(self, question: str, steps: Sequence[str]) -> tuple[bool, float | None]:
        """(True, score) where the prefix was scored before, else (False, None); counts hits."""
        key = (question, tuple(steps))
        if key in self._scores:
            self._scores.move_to_end(key)
            self.hits += 1
            return True, self._scores[key]
        self.misses += 1
        return False, None

    def put(self, question: str, steps: Sequence[str], score: float | None) -> None:
        key = (question, tuple(steps))
        self._scores[key] = score
        self._scores.move_to_end(key)
        while len(self._scores) > self.max_entries:
            self._scores.popitem(last=False)

    def clear(self) -> None:
        self._scores.clear()
        self.hits = self.misses = 0


ScoreNew = Callable[[list[Steps]], Awaitable[Mapping[Steps, PrefixOutcome]]]
"""A scorer's own work: the new prefixes (unique, not cached; every prefix of a listed prefix is
listed too unless cached) to what scoring each gave. It may answer more prefixes than asked (a PRM
scores every prefix of a path in one pass); a prefix it leaves out counts as a failure."""


async def score_paths(cache: PrefixScoreCache, question: str, paths: Sequence[Sequence[str]],
                      score_new: ScoreNew, *, scorer: str = "process scorer") -> list[list[float | None]]:
    """The ``ProcessScorer.score`` contract, for any scorer: look every prefix up in ``cache``,
    have ``score_new`` score the rest (one call for all of them), cache what it gave, and answer
    one score per step of every path. Raises as ``ProcessScorer.score`` says."""
    keys = [_steps(path) for path in paths]
    known: dict[Steps, float | None] = {}
    missing: dict[Steps, None] = {}  # ordered, unique
    for steps in keys:
        for k in range(1, len(steps) + 1):
            prefix = steps[:k]
            if prefix in known or prefix in missing:
                continue
            hit, value = cache.lookup(question, prefix)
            if hit:
                known[prefix] = value
            else:
                missing[prefix] = None
    failures: dict[Steps, BaseException] = {}
    if missing:
        answered = await score_new(list(missing))
        for prefix, outcome in answered.items():
            if isinstance(outcome, BaseException):
                failures[prefix] = outcome
                continue
            try:
                value = _checked(outcome, scorer)
            except BackendError as exc:  # never a wrong score: the prefix counts as failed
                failures[prefix] = exc
                continue
            cache.put(question, prefix, value)
            known[prefix] = value
        for prefix in missing:
            if prefix not in known and prefix not in failures:
                failures[prefix] = BackendError(f"{scorer} gave no score for a prefix of {len(prefix)} steps")
    result = [[known.get(steps[:k]) for k in range(1, len(steps) + 1)] for steps in keys]
    if failures:
        bugs = [e for e in failures.values() if not isinstance(e, (BackendError, BudgetExhausted))]
        if bugs:
            raise bugs[0]
        refused = [e for e in failures.values() if isinstance(e, BudgetExhausted)]
        scored_new = sum(1 for p in missing if p in known)
        if refused and scored_new == 0 and len(refused) == len(failures):
            raise refused[0]
        first = next(iter(failures.values()))
        raise ProcessScoringFailed(
            f"{scorer} failed on {len(failures)} of {len(missing)} new prefixes: {first}", result,
            exhausted=bool(refused))
    return result


def _steps(path: Sequence[str]) -> Steps:
    if isinstance(path, str):
        raise ConfigError("a path is a sequence of steps (strings), not one string")
    steps = tuple(path)
    if any(not isinstance(s, str) for s in steps):
        raise ConfigError("every step of a path must be a string")
    return steps


def _checked(value: float | None, scorer: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 \
            or math.isnan(value):
        raise BackendError(f"{scorer} gave a score outside [0, 1]: {value!r}")
    return float(value)
