"""The oracle ceiling of a bank: pass@k, what a perfect selector would score with k samples.

A question counts as right at k when any of its first k samples (in a random order) is right.
Over all orders of a question's n samples, c of them right, that happens with probability
1 - C(n - c, k) / C(n, k) (the unbiased pass@k estimator), so the curve is exact: no orders are
drawn. No selection rule (vote, score, stop) can beat it with k samples, which makes it the
ceiling the stopping rules' points are drawn under.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from apportion.answers.equivalence import Equivalence
from apportion.banks import BankEntry, SampleBank


@dataclass(frozen=True, slots=True)
class OraclePoint:
    budget: int
    accuracy: float
    """pass@budget, averaged over questions."""
    input_tokens: float
    output_tokens: float
    """Mean tokens per question of ``budget`` samples (what uniform sampling at that budget spends)."""

    def to_dict(self) -> dict[str, float]:
        return {"budget": self.budget, "accuracy": self.accuracy, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "tokens": self.input_tokens + self.output_tokens}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of n samples drawn without replacement include one of the c right ones."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def oracle_curve(bank: SampleBank, equivalence: Equivalence | None = None) -> list[OraclePoint]:
    """pass@k at every k from 1 to the bank's samples per question, with the tokens uniform sampling
    spends at k (the prompt once, as one request of k samples; k times a sample's mean output)."""
    if not bank.entries:
        return []
    eq = equivalence or Equivalence()
    right = [_right_samples(e, eq) for e in bank.entries]
    points = []
    for k in range(1, bank.k + 1):
        accuracy = statistics.fmean(pass_at_k(len(e.samples), c, k) for e, c in zip(bank.entries, right))
        output = statistics.fmean(k * _mean_output(e) for e in bank.entries)
        points.append(OraclePoint(k, accuracy, statistics.fmean(e.prompt_tokens for e in bank.entries), output))
    return points


def _right_samples(entry: BankEntry, eq: Equivalence) -> int:
    verdicts: dict[str, bool] = {}  # many samples share an answer: each is graded once
    count = 0
    for sample in entry.samples:
        if sample.answer is None:
            continue
        if sample.answer not in verdicts:
            verdicts[sample.answer] = eq.same(sample.answer, entry.problem.answer)
        count += verdicts[sample.answer]
    return count


def _mean_output(entry: BankEntry) -> float:
    return statistics.fmean(s.output_tokens for s in entry.samples) if entry.samples else 0.0
