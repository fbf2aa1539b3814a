"""Outcome scorers: a score in [0, 1] per candidate solution, higher is better.

A scorer that calls a model does so through the run's MeteredLM (``lm.scorer(...)``), so its
spend lands in the same ledger as the samples it judges.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from apportion.lm.metered import MeteredLM
from apportion.result import Candidate


@runtime_checkable
class OutcomeScorer(Protocol):
    name: str
    needs_logprobs: bool

    async def score(self, lm: MeteredLM, question: str,
                    candidates: Sequence[Candidate]) -> list[float | None]:
        """One score per candidate; None where no score could be had (budget, unparseable).
        Raises ScoringFailed, carrying the scores that were had, when calls fail."""
        ...
