"""A learned difficulty estimator: how often a vote of a given shape is right, fitted on banks.

The agreement estimator assumes an answer is right as often as it is sampled. That is wrong in
both directions for real models: a weak model's unanimous answer is wrong more often than its
share says (it repeats its mistakes), and a long, low-confidence trace is a warning sign no vote
count shows. Here a small logistic model, trained on earlier runs (sample banks with gold answers),
maps the shape of a vote (agreement, margin, how many answers, how many samples gave none, how
many samples) and the prompt's confidence (mean token log-probability, length) to the chance the
vote's winner is right. The forward projection is the agreement estimator's: posterior draws of
the answer distribution and simulated future votes; each simulated vote is scored by the learned
model instead of the share rule.

Training needs scikit-learn (``pip install apportion[allocate]``); a trained estimator is saved
as JSON (coefficients, feature names, training banks) and applied with numpy alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apportion.algorithms.voting import tally
from apportion.allocate.difficulty import AgreementEstimator, Estimate, Evidence, simulate
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import placeholder_in, read_answer_for
from apportion.banks import SampleBank
from apportion.errors import ConfigError
from apportion.result import Candidate

FEATURES = ("agreement", "margin", "unanswered", "log_classes", "log_samples", "mean_logprob", "has_logprob",
            "log_tokens")
ESTIMATOR_VERSION = 1


def vote_features(votes: np.ndarray, unanswered: np.ndarray, mean_logprob: float | None,
                  mean_tokens: float) -> np.ndarray:
    """Features of vote states: ``votes[..., class]`` answer counts, ``unanswered[...]`` samples
    without an answer; the prompt's confidence is the same for every state."""
    ordered = -np.sort(-votes, axis=-1)
    answered = ordered.sum(axis=-1)
    samples = np.maximum(answered + unanswered, 1)
    top = ordered[..., 0]
    second = ordered[..., 1] if ordered.shape[-1] > 1 else np.zeros_like(top)
    classes = (ordered > 0).sum(axis=-1)
    shape = top.shape
    return np.stack([
        top / samples, (top - second) / samples, unanswered / samples, np.log1p(classes), np.log(samples),
        np.full(shape, mean_logprob if mean_logprob is not None else 0.0),
        np.full(shape, 1.0 if mean_logprob is not None else 0.0), np.full(shape, math.log1p(mean_tokens)),
    ], axis=-1).astype(float)


@dataclass(frozen=True, slots=True)
class LearnedEstimator:
    coef: tuple[float, ...]
    intercept: float
    trained_on: tuple[str, ...] = ()
    examples: int = 0
    prior: AgreementEstimator = field(default_factory=AgreementEstimator)
    name: str = "learned"

    def __post_init__(self) -> None:
        if len(self.coef) != len(FEATURES):
            raise ConfigError(f"a learned estimator has {len(FEATURES)} coefficients, got {len(self.coef)}")

    def right(self, features: np.ndarray) -> np.ndarray:
        z = features @ np.asarray(self.coef) + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-z)))

    def estimate(self, evidence: Evidence, horizon: int) -> Estimate:
        p = self.prior
        votes, _ = simulate(evidence, horizon, p.alpha, p.unseen, p.draws, p.seed)
        drawn = np.arange(horizon + 1)[None, :] + evidence.samples
        unanswered = drawn - votes.sum(axis=2)
        chance = self.right(vote_features(votes, unanswered, evidence.mean_logprob, evidence.mean_tokens))
        chance = np.where(votes.max(axis=2) > 0, chance, 0.0)  # no answer yet: nothing can be right
        prior = p.estimate(evidence, 0)
        return Estimate(tuple(float(x) for x in chance.mean(axis=0)), prior.low, prior.high, evidence)

    def to_dict(self) -> dict[str, Any]:
        return {"estimator": ESTIMATOR_VERSION, "features": list(FEATURES), "coef": list(self.coef),
                "intercept": self.intercept, "trained_on": list(self.trained_on), "examples": self.examples}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LearnedEstimator:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read estimator {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("estimator") != ESTIMATOR_VERSION:
            raise ConfigError(f"{path} is not a saved estimator (version {ESTIMATOR_VERSION})")
        if data.get("features") != list(FEATURES):
            raise ConfigError(f"{path} was trained on other features: {data.get('features')}")
        return cls(tuple(float(c) for c in data["coef"]), float(data["intercept"]),
                   tuple(data.get("trained_on", [])), int(data.get("examples", 0)))


def training_rows(bank: SampleBank, equivalence: Equivalence, *, orders: int = 4, seed: int = 0,
                  system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features, right) for every prefix of every order of every question: the vote after the
    first k samples, and whether its winner is the gold answer."""
    placeholder = placeholder_in(system_prompt if system_prompt is not None else
                                 (bank.meta.get("sampling") or {}).get("system_prompt"))
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for entry in bank.entries:
        candidates = [_candidate(s.text, s.output_tokens, s.mean_logprob, placeholder) for s in entry.samples]
        gold = entry.problem.answer
        for _ in range(orders):
            order = [candidates[i] for i in rng.permutation(len(candidates))]
            for k in range(1, len(order) + 1):
                seen = order[:k]
                ev = Evidence.of(seen, equivalence)
                winner = tally(seen, equivalence).winner
                votes = np.array([[*ev.counts, 0]], dtype=float)
                features.append(vote_features(votes, np.array([ev.unanswered], dtype=float), ev.mean_logprob,
                                              ev.mean_tokens)[0])
                labels.append(winner is not None and equivalence.same(winner, gold))
    return np.array(features), np.array(labels, dtype=int)


def train(banks: Sequence[tuple[str, SampleBank]], *, orders: int = 4, seed: int = 0,
          equivalence: Equivalence | None = None) -> LearnedEstimator:
    """A logistic model over all prefixes of ``banks`` (name, bank); needs scikit-learn."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("training an estimator needs scikit-learn: pip install 'apportion[allocate]'") from exc
    eq = equivalence or Equivalence()
    parts = [training_rows(bank, eq, orders=orders, seed=seed) for _, bank in banks]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if len(set(y.tolist())) < 2:
        raise ConfigError("the training banks' votes are all right or all wrong: nothing to learn from")
    model = LogisticRegression(C=1.0, max_iter=2000).fit(x, y)
    return LearnedEstimator(tuple(float(c) for c in model.coef_[0]), float(model.intercept_[0]),
                            tuple(name for name, _ in banks), len(y))


def _candidate(text: str, tokens: int, mean_logprob: float | None, placeholder: str | None) -> Candidate:
    answer, raw, method = read_answer_for(text, placeholder)
    return Candidate(text, answer, raw, method, "stop", tokens, mean_logprob)

