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
- ``deepconf`` (Fu et al. 2025, DeepConf online): a trace's confidence is its lowest group
  confidence (the mean token confidence over a sliding ``window``; token confidence is minus the
  mean log-probability of the ``top_k`` most probable tokens). A first round of ``warmup`` traces
  sets a threshold, the confidence that keeps the best ``keep`` share of them; later traces are
  cut mid-decode when a window falls under it, traces under it carry no vote, the others vote
  with their confidence as weight, and sampling stops once the leader holds ``consensus`` of the
  weight. With only the sampled tokens' log-probabilities it uses those (and says so); with
  none, it says so and runs ``beta`` instead.

Beyond ``decide``, a rule may ask the backend for top-k log-probabilities (``top_logprobs``),
give each next round a per-sample ``cut``, weigh the vote (``vote_weights``), and replace itself
for a backend that cannot serve it (``for_backend``).
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
from apportion.lm.base import Capabilities, Cut, Partial
from apportion.result import Candidate


@dataclass(frozen=True, slots=True)
class Rounds:
    """Round sizes: ``first``, then ``then`` each where set, else each ``growth`` times the last
    (rounded); at most ``largest``."""

    first: int = 2
    growth: float = 1.0
    largest: int = 64
    then: int | None = None

    def __post_init__(self) -> None:
        if self.first < 1 or self.largest < self.first or self.growth < 1 or (self.then is not None and self.then < 1):
            raise ConfigError(f"rounds need first >= 1, largest >= first, growth >= 1 and then >= 1, got {self}")

    def size(self, index: int) -> int:
        if index and self.then is not None:
            return min(self.largest, self.then)
        return min(self.largest, max(1, round(self.first * self.growth**index)))


@dataclass(frozen=True, slots=True)
class Seen:
    """What a rule is shown after a round."""

    candidates: Sequence[Candidate]
    previous: int
    """How many candidates there were at the previous check (0 at the first)."""
    equivalence: Equivalence
    notes: list[str] = field(default_factory=list)
    """Where a rule says what the user must know (the run's notes)."""


class StopRule(ABC):
    name: ClassVar[str]

    @property
    @abstractmethod
    def rounds(self) -> Rounds: ...

    @abstractmethod
    def decide(self, seen: Seen) -> str | None:
        """A reason to stop now, or None to sample on."""

    @property
    def top_logprobs(self) -> int:
        """Alternatives per token the rule needs (``SamplingParams.top_logprobs``)."""
        return 0

    def cut(self, seen: Seen) -> Cut | None:
        """The per-sample predicate for the next round (None: let samples finish)."""
        return None

    def vote_weights(self, candidates: Sequence[Candidate]) -> list[float | None] | None:
        """How much each candidate's answer counts in a vote (None: one each)."""
        return None

    def for_backend(self, capabilities: Capabilities) -> tuple[StopRule, str | None]:
        """The rule to run on a backend with these capabilities, and a note when it is not this one."""
        return self, None

    def __add__(self, other: StopRule) -> StopRule:
        return AnyOf((*_parts(self), *_parts(other)))

    def describe(self) -> str:
        # growth is shown only where set, so that the labels of fixed-round rules stay short
        values = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)  # type: ignore[arg-type]
                          if not (f.name == "growth" and getattr(self, f.name) == 1))
        return f"{self.name}:{values}" if values else self.name


class _FixedRounds(StopRule):
    """A rule whose rounds start at ``round`` samples and grow by ``growth`` (1: all the same
    size; 2: 1, 2, 4, ... from a round of 1), both dataclass fields of each rule."""

    round: int
    growth: float

    @property
    def rounds(self) -> Rounds:
        return Rounds(self.round, growth=self.growth)

    def _check_rounds(self) -> None:
        if self.round < 1:
            raise ConfigError(f"{self.name}: round must be >= 1, got {self.round}")
        if self.growth < 1:
            raise ConfigError(f"{self.name}: growth must be >= 1, got {self.growth}")


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
    growth: float = 1.0
    draws: int = 4000
    name: ClassVar[str] = "beta"

    def __post_init__(self) -> None:
        self._check_rounds()
        if not 0.5 < self.threshold < 1:
            raise ConfigError(f"beta: threshold must be in (0.5, 1), got {self.threshold}")
        if self.draws < 100:
            raise ConfigError(f"beta: draws must be >= 100, got {self.draws}")

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
    growth: float = 1.0
    name: ClassVar[str] = "relative-gain"

    def __post_init__(self) -> None:
        self._check_rounds()
        if self.epsilon <= 0 or self.min_samples < 2:
            raise ConfigError("relative-gain: epsilon > 0 and min_samples >= 2 are required")

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
    growth: float = 1.0
    name: ClassVar[str] = "score"

    def __post_init__(self) -> None:
        self._check_rounds()
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"score: threshold must be in (0, 1], got {self.threshold}")

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
    growth: float = 1.0
    name: ClassVar[str] = "give-up"

    def __post_init__(self) -> None:
        self._check_rounds()
        if self.min_samples < 2 or not 0 < self.max_share < 1:
            raise ConfigError("give-up: min_samples >= 2 and max_share in (0, 1) are required")

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
class DeepConf(StopRule):
    warmup: int = 4
    round: int = 2
    window: int = 16
    keep: float = 0.9
    consensus: float = 0.95
    top_k: int = 20
    name: ClassVar[str] = "deepconf"

    def __post_init__(self) -> None:
        if self.warmup < 2 or self.round < 1 or self.window < 1 or not 1 <= self.top_k <= 20:
            raise ConfigError("deepconf: warmup >= 2, round >= 1, window >= 1 and top_k in [1, 20] are required")
        if not 0 < self.keep <= 1 or not 0.5 < self.consensus <= 1:
            raise ConfigError(f"deepconf: keep must be in (0, 1] and consensus in (0.5, 1], got {self.keep}, "
                              f"{self.consensus}")

    @property
    def rounds(self) -> Rounds:
        return Rounds(self.warmup, then=self.round)

    @property
    def top_logprobs(self) -> int:
        return self.top_k

    def for_backend(self, capabilities: Capabilities) -> tuple[StopRule, str | None]:
        if capabilities.logprobs:
            return self, None
        return Beta(round=self.round), ("deepconf: the backend returns no token log-probabilities, so trace "
                                        "confidence cannot be measured; stopping by beta instead")

    def threshold(self, candidates: Sequence[Candidate]) -> float | None:
        """The confidence that keeps the best ``keep`` share of the warmup traces."""
        warm = [c for c in candidates[: self.warmup] if c.finish_reason != "cut"]
        scores = [s for c in warm if (s := trace_confidence(c, self.window)) is not None]
        if len(scores) < min(2, self.warmup):
            return None
        return float(np.quantile(scores, 1 - self.keep, method="lower"))

    def vote_weights(self, candidates: Sequence[Candidate]) -> list[float | None]:
        floor = self.threshold(candidates)
        out: list[float | None] = []
        for c in candidates:
            conf = trace_confidence(c, self.window)
            if conf is None:
                out.append(1.0)  # nothing to judge it by: a plain vote
            elif floor is not None and conf < floor:
                out.append(None)
            else:
                out.append(_weight(c, conf))
        return out

    def cut(self, seen: Seen) -> Cut | None:
        floor = self.threshold(seen.candidates)
        if floor is None:
            return None
        sampled = not any(c.confidences for c in seen.candidates)
        return GroupConfidenceCut(self.window, floor, sampled)

    def decide(self, seen: Seen) -> str | None:
        if not seen.previous and any(c.logprobs for c in seen.candidates) \
                and not any(c.confidences for c in seen.candidates):
            seen.notes.append("deepconf: no top-k log-probabilities from this backend; trace confidence "
                              "comes from the sampled tokens' log-probabilities only")
        t = tally(seen.candidates, seen.equivalence, self.vote_weights(seen.candidates))
        total = sum(t.distribution.values())
        if t.winner is None or total <= 0:
            return None
        return self.name if max(t.distribution.values()) / total >= self.consensus else None


def trace_confidence(c: Candidate, window: int) -> float | None:
    """The lowest mean token confidence over any ``window`` consecutive tokens (the whole trace
    when shorter): top-k confidences where known, else the sampled tokens' log-probabilities."""
    values = c.confidences or c.logprobs
    if not values:
        return None
    if len(values) <= window:
        return math.fsum(values) / len(values)
    sums = np.cumsum(np.asarray(values, dtype=np.float64))
    sums = np.concatenate(([0.0], sums))
    return float(np.min(sums[window:] - sums[:-window]) / window)


def _weight(c: Candidate, confidence: float) -> float:
    # Top-k confidences are positive (minus a mean log-probability); a sampled-token log-probability
    # is not, and counts as the probability it stands for.
    return confidence if c.confidences else math.exp(confidence)


@dataclass(frozen=True, slots=True)
class GroupConfidenceCut:
    """Ends a sample when the mean confidence of its last ``window`` tokens falls under ``floor``."""

    window: int
    floor: float
    sampled: bool = False

    def __call__(self, part: Partial) -> bool:
        values = part.logprobs if self.sampled else part.confidences
        if len(values) < self.window:
            return False
        return math.fsum(values[-self.window:]) / self.window < self.floor


@dataclass(frozen=True)
class AnyOf(StopRule):
    rules: tuple[StopRule, ...] = field(default_factory=tuple)
    name: ClassVar[str] = "any-of"

    @property
    def rounds(self) -> Rounds:
        return self.rules[0].rounds

    def decide(self, seen: Seen) -> str | None:
        return next((reason for rule in self.rules if (reason := rule.decide(seen)) is not None), None)

    @property
    def top_logprobs(self) -> int:
        return max(r.top_logprobs for r in self.rules)

    def cut(self, seen: Seen) -> Cut | None:
        return next((c for r in self.rules if (c := r.cut(seen)) is not None), None)

    def vote_weights(self, candidates: Sequence[Candidate]) -> list[float | None] | None:
        return next((w for r in self.rules if (w := r.vote_weights(candidates)) is not None), None)

    def for_backend(self, capabilities: Capabilities) -> tuple[StopRule, str | None]:
        pairs = [r.for_backend(capabilities) for r in self.rules]
        notes = [n for _, n in pairs if n]
        return AnyOf(tuple(r for r, _ in pairs)), "; ".join(notes) or None

    def describe(self) -> str:
        return "+".join(r.describe() for r in self.rules)


STOP_RULES: dict[str, type[StopRule]] = {r.name: r for r in (ESC, Beta, RelativeGain, ScoreThreshold, GiveUp,
                                                               DeepConf)}


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
