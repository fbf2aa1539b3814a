"""How hard a prompt is, from the samples drawn for it so far, with the uncertainty of that guess.

The estimate is a success curve: ``curve[j]`` is the expected chance that a vote over the samples
drawn so far plus ``j`` more is right. It comes from a Dirichlet posterior over the prompt's
answer distribution (the answers seen, two unseen answers, and "no answer"), projected forward by
simulation: for each posterior draw, future samples are drawn, the vote is taken after each, and
the winner's chance of being right is read off. Without labels, an answer's chance of being right
is taken to be its share of all samples (samples with no answer count against every answer: a
model that rarely finishes is rarely right when it does): a question whose samples scatter over many answers
is likely hopeless (every answer is weak, and more samples barely change which weak answer wins),
one whose samples all agree is likely settled, and the budget goes where a plurality is still
forming. This is what "feed the most contested question" rules miss: they cannot tell a scattered
(hopeless) question from a two-way (winnable) one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from apportion.answers.equivalence import Equivalence
from apportion.errors import ConfigError
from apportion.result import Candidate


@dataclass(frozen=True, slots=True)
class Evidence:
    """What a prompt's samples say: the size of each answer class (largest first), the samples
    with no answer, their mean log-probability and length."""

    counts: tuple[int, ...]
    unanswered: int
    mean_logprob: float | None = None
    mean_tokens: float = 0.0

    @property
    def samples(self) -> int:
        return sum(self.counts) + self.unanswered

    @property
    def agreement(self) -> float:
        """The largest answer class's share of all samples (0 without samples)."""
        return self.counts[0] / self.samples if self.counts else 0.0

    @classmethod
    def of(cls, candidates: Sequence[Candidate], equivalence: Equivalence) -> Evidence:
        classes = equivalence.cluster([c.answer for c in candidates])
        sizes: dict[int, int] = {}
        for k in classes:
            if k is not None:
                sizes[k] = sizes.get(k, 0) + 1
        logprobs = [c.mean_logprob for c in candidates if c.mean_logprob is not None]
        return cls(tuple(sorted(sizes.values(), reverse=True)), sum(k is None for k in classes),
                   math.fsum(logprobs) / len(logprobs) if logprobs else None,
                   math.fsum(c.output_tokens for c in candidates) / len(candidates) if candidates else 0.0)


@dataclass(frozen=True, slots=True)
class Estimate:
    """A prompt's success curve and how sure the estimate is."""

    curve: tuple[float, ...]
    """``curve[j]``: expected chance the vote is right after ``j`` more samples (j = 0..horizon)."""
    low: float
    high: float
    """10th and 90th percentiles over the posterior of the chance the current leader is right."""
    evidence: Evidence

    def value(self, k: int) -> float:
        """The success model of ``allocate.greedy``: k more samples."""
        return self.curve[min(max(k, 0), len(self.curve) - 1)]

    @property
    def difficulty(self) -> float:
        """1 minus the chance the vote is right at the horizon: 0 easy, 1 hopeless."""
        return 1.0 - self.curve[-1]

    def to_dict(self) -> dict[str, object]:
        return {"difficulty": round(self.difficulty, 4), "right_now": round(self.curve[0], 4),
                "interval": [round(self.low, 4), round(self.high, 4)],
                "gain_to_horizon": round(self.curve[-1] - self.curve[0], 4),
                "samples": self.evidence.samples, "agreement": round(self.evidence.agreement, 4)}


class Estimator(Protocol):
    @property
    def name(self) -> str: ...

    def estimate(self, evidence: Evidence, horizon: int) -> Estimate:
        """The success curve for up to ``horizon`` more samples."""
        ...


@dataclass(frozen=True, slots=True)
class AgreementEstimator:
    """Dirichlet-multinomial projection of the vote (the module docstring says why)."""

    alpha: float = 0.5
    """Prior pseudo-count of each answer seen, and of "no answer"."""
    unseen: float = 0.5
    """Prior pseudo-count of each of the two answers not seen yet."""
    draws: int = 256
    seed: int = 0
    name: str = "agreement"

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.unseen <= 0 or self.draws < 1:
            raise ConfigError("alpha and unseen must be > 0 and draws >= 1")

    def estimate(self, evidence: Evidence, horizon: int) -> Estimate:
        votes, theta = simulate(evidence, horizon, self.alpha, self.unseen, self.draws, self.seed)
        answers = votes.shape[2]
        right = theta[:, :answers]  # an answer's chance of being right: its share of all samples
        winner = votes.argmax(axis=2)  # ties go to the earlier class: the current leader
        p = np.where(votes.max(axis=2) > 0, np.take_along_axis(right, winner, axis=1), 0.0)
        now = p[:, 0]
        return Estimate(tuple(float(x) for x in p.mean(axis=0)), float(np.quantile(now, 0.1)),
                        float(np.quantile(now, 0.9)), evidence)


def simulate(evidence: Evidence, horizon: int, alpha: float, unseen: float, draws: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Posterior draws of the answer distribution (classes: the answers seen, two unseen, then "no
    answer"), and for each the vote counts per answer class after 0..horizon more samples:
    ``votes[draw, j, class]``."""
    if horizon < 0:
        raise ConfigError(f"horizon must be >= 0, got {horizon}")
    counts = np.array([*evidence.counts, 0, 0], dtype=np.int64)  # two answers not seen yet
    answers = len(counts)
    prior = np.array([alpha] * len(evidence.counts) + [unseen, unseen, alpha])
    rng = np.random.default_rng(_stable_seed(seed, evidence))
    theta = rng.dirichlet(prior + np.append(counts, evidence.unanswered), size=draws)
    cum = np.cumsum(theta, axis=1)
    picks = (rng.random((draws, horizon, 1)) > cum[:, None, :]).sum(axis=2)
    onehot = picks[:, :, None] == np.arange(answers)[None, None, :]
    votes = counts[None, None, :] + np.concatenate(
        [np.zeros((draws, 1, answers), dtype=np.int64), np.cumsum(onehot, axis=1)], axis=1)
    return votes, theta


def _stable_seed(seed: int, evidence: Evidence) -> int:
    """Identical evidence gives an identical curve, whatever order prompts are estimated in."""
    key = f"{seed}|{evidence.counts}|{evidence.unanswered}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def bins_of(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """The bin of each value given ascending inner ``edges`` (bin 0 below edges[0], ...)."""
    return [int(np.searchsorted(np.asarray(edges), v, side="right")) for v in values]


def quantile_edges(values: Sequence[float], bins: int) -> tuple[float, ...]:
    """Inner edges splitting ``values`` into ``bins`` groups of near-equal size (Snell et al.'s
    bins are quantiles of estimated difficulty)."""
    if bins < 1:
        raise ConfigError(f"bins must be >= 1, got {bins}")
    if not values or bins == 1:
        return ()
    return tuple(float(q) for q in np.quantile(np.asarray(values), [i / bins for i in range(1, bins)]))
