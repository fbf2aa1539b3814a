"""Stopping rules: sample in rounds and stop when more samples are unlikely to change the answer.

A rule is a small object with its parameters. After every round the sampling loop shows it the
candidates so far (scored, for best-of-N) and the count at the previous check; the rule answers
with a reason to stop (its name, or ``give-up``) or None. Its ``rounds`` say how many samples
each round asks for (one request with ``n`` = the round's size). Rules combine with ``+``: the
first to fire stops the run.

- ``esc`` (Li et al. 2024, early-stopping self-consistency): stop when the last ``window``
  samples all give the same answer.
- ``beta`` (Aggarwal et al. 2023, Adaptive-Consistency): stop when the posterior probability that
  the current leading answer stays the leader passes ``threshold``: Beta over the two leading
  counts when there are at most two answers, Dirichlet (seeded Monte Carlo) over all of them
  otherwise.
- ``relative-gain`` (seed 001): stop when the leader's vote share moved by less than ``epsilon``
  of itself over the last round, (Q(b + db) - Q(b)) / Q(b), once ``min_samples`` are in.
- ``score``: stop as soon as a candidate with an answer scores at least ``threshold`` (its
  scorer's score, or its self-certainty where it has none); with rounds of one sample, the only
  rule that can stop after a single sample.
- ``give-up``: stop a question whose votes will not converge: after ``min_samples``, when the
  leader holds at most ``max_share`` of the answered samples and most answers are distinct.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from apportion.algorithms.voting import tally
from apportion.answers.equivalence import Equivalence
from apportion.errors import ConfigError
from apportion.result import Candidate


@dataclass(frozen=True, slots=True)
class Rounds:
    """Round sizes: ``first``, then each ``growth`` times the last (rounded), at most ``largest``."""

    first: int = 2
    growth: float = 1.0
    largest: int = 64

    def __post_init__(self) -> None:
        if self.first < 1 or self.largest < self.first or self.growth < 1:
            raise ConfigError(f"rounds need first >= 1, largest >= first and growth >= 1, got {self}")

    def size(self, index: int) -> int:
        return min(self.largest, max(1, round(self.first * self.growth**index)))


@dataclass(frozen=True, slots=True)
class Seen:
    """What a rule is shown after a round."""

    candidates: Sequence[Candidate]
    previous: int
    """How many candidates there were at the previous check (0 at the first)."""
    equivalence: Equivalence


class StopRule(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def rounds(self) -> Rounds: ...

    @abstractmethod
    def decide(self, seen: Seen) -> str | None:
        """A reason to stop now, or None to sample on."""

    def __add__(self, other: StopRule) -> StopRule:
        return AnyOf((*_parts(self), *_parts(other)))

    def describe(self) -> str:
        values = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))  # type: ignore[arg-type]
        return f"{self.name}:{values}" if values else self.name


class _FixedRounds(StopRule):
    """A rule whose rounds all have ``round`` samples (a dataclass field of each rule)."""

    round: int

    @property
    def rounds(self) -> Rounds:
        return Rounds(self.round)


def _parts(rule: StopRule) -> tuple[StopRule, ...]:
    return rule.rules if isinstance(rule, AnyOf) else (rule,)


def _votes(seen: Seen) -> list[int]:
    """Vote counts per distinct answer, largest first."""
    return sorted((int(v) for v in tally(seen.candidates, seen.equivalence).distribution.values()), reverse=True)


@dataclass(frozen=True)
class ESC(StopRule):
    window: int = 4
    name: ClassVar[str] = "esc"

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ConfigError(f"esc: window must be >= 2, got {self.window}")

    @property
    def rounds(self) -> Rounds:
        return Rounds(self.window)

    def decide(self, seen: Seen) -> str | None:
        last = list(seen.candidates)[-self.window:]
        if len(last) < self.window or any(c.answer is None for c in last):
            return None
        classes = seen.equivalence.cluster([c.answer for c in last])
        return self.name if len(set(classes)) == 1 else None


@dataclass(frozen=True)
class Beta(_FixedRounds):
    threshold: float = 0.95
    round: int = 2
    draws: int = 4000
    name: ClassVar[str] = "beta"

    def __post_init__(self) -> None:
        if not 0.5 < self.threshold < 1:
            raise ConfigError(f"beta: threshold must be in (0.5, 1), got {self.threshold}")
        if self.round < 1 or self.draws < 100:
            raise ConfigError("beta: round must be >= 1 and draws >= 100")

    def decide(self, seen: Seen) -> str | None:
        votes = _votes(seen)
        if not votes:
            return None
        return self.name if leader_stays(votes, self.draws) >= self.threshold else None


def leader_stays(votes: Sequence[int], draws: int = 4000) -> float:
    """P(the answer with ``votes[0]`` has the largest probability) under a uniform prior: exact for
    one or two answers (a Beta tail is a binomial sum), seeded Monte Carlo over the Dirichlet for more."""
    if len(votes) <= 2:
        a, b = votes[0] + 1, (votes[1] if len(votes) == 2 else 0) + 1
        # P(X > 1/2) for X ~ Beta(a, b) with whole a, b: P(Binomial(a + b - 1, 1/2) <= a - 1)
        n = a + b - 1
        return sum(math.comb(n, k) for k in range(a)) / 2**n
    rng = np.random.default_rng(sum(votes) * 7919 + len(votes))
    sample = rng.dirichlet(np.asarray(votes, dtype=float) + 1.0, size=draws)
    return float(np.mean(np.argmax(sample, axis=1) == 0))


@dataclass(frozen=True)
class RelativeGain(_FixedRounds):
    epsilon: float = 0.05
    min_samples: int = 4
    round: int = 2
    name: ClassVar[str] = "relative-gain"

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or self.min_samples < 2 or self.round < 1:
            raise ConfigError("relative-gain: epsilon > 0, min_samples >= 2 and round >= 1 are required")

    def decide(self, seen: Seen) -> str | None:
        if len(seen.candidates) < self.min_samples or seen.previous < 1:
            return None
        before = _share(Seen(seen.candidates[: seen.previous], 0, seen.equivalence))
        now = _share(seen)
        if before <= 0 or now <= 0:
            return None
        return self.name if abs(now - before) / before < self.epsilon else None


def _share(seen: Seen) -> float:
    votes = _votes(seen)
    return votes[0] / len(seen.candidates) if votes else 0.0


@dataclass(frozen=True)
class ScoreThreshold(_FixedRounds):
    threshold: float = 0.9
    round: int = 1
    name: ClassVar[str] = "score"

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or self.round < 1:
            raise ConfigError(f"score: threshold must be in (0, 1] and round >= 1, got {self.threshold}")

    def decide(self, seen: Seen) -> str | None:
        for c in seen.candidates:
            score = c.score if c.score is not None else (
                None if c.mean_logprob is None else math.exp(c.mean_logprob))
            if c.answer is not None and score is not None and score >= self.threshold:
                return self.name
        return None


@dataclass(frozen=True)
class GiveUp(_FixedRounds):
    min_samples: int = 6
    max_share: float = 0.34
    round: int = 2
    name: ClassVar[str] = "give-up"

    def __post_init__(self) -> None:
        if self.min_samples < 2 or not 0 < self.max_share < 1 or self.round < 1:
            raise ConfigError("give-up: min_samples >= 2, max_share in (0, 1) and round >= 1 are required")

    def decide(self, seen: Seen) -> str | None:
        n = len(seen.candidates)
        if n < self.min_samples:
            return None
        votes = _votes(seen)
        answered = sum(votes)
        if not answered:
            return self.name  # nothing answerable in min_samples tries
        spread = len(votes) / answered > 0.5
        return self.name if votes[0] / answered <= self.max_share and spread else None


@dataclass(frozen=True)
class AnyOf(StopRule):
    rules: tuple[StopRule, ...] = field(default_factory=tuple)
    name: ClassVar[str] = "any-of"

    @property
    def rounds(self) -> Rounds:
        return self.rules[0].rounds

    def decide(self, seen: Seen) -> str | None:
        return next((reason for rule in self.rules if (reason := rule.decide(seen)) is not None), None)

    def describe(self) -> str:
        return "+".join(r.describe() for r in self.rules)


STOP_RULES: dict[str, type[StopRule]] = {r.name: r for r in (ESC, Beta, RelativeGain, ScoreThreshold, GiveUp)}


def parse_stop(text: str) -> StopRule:
    """``"beta"``, ``"esc:window=3"``, ``"beta:threshold=0.9,round=4+give-up"``: rules joined with
    ``+``, each with ``key=value`` settings after a colon."""
    rules = [_parse_one(part.strip()) for part in text.split("+")]
    return rules[0] if len(rules) == 1 else AnyOf(tuple(rules))


def _parse_one(text: str) -> StopRule:
    name, _, settings = text.partition(":")
    kind = STOP_RULES.get(name.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown stop rule {name.strip()!r}; known: {', '.join(STOP_RULES)}")
    types = {f.name: f.type for f in fields(kind)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in settings.split(","))):
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise ConfigError(f"stop rule {kind.name}: expected key=value with keys {', '.join(types)}, got {pair!r}")
        try:
            values[key] = int(raw) if types[key] in ("int", int) else float(raw)
        except ValueError:
            raise ConfigError(f"stop rule {kind.name}: {key} must be a number, got {raw!r}") from None
    return kind(**values)
