"""Scores recorded in a sample bank (a reward model's, drawn with the samples), served to live
algorithms running on the bank's ``ReplayBackend``, so best-of-N and score-based stopping replay
with the scores the bank was drawn with. No model call, no spend."""

from __future__ import annotations

from collections.abc import Sequence

from apportion.banks import SampleBank
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate


class RecordedScorer:
    name = "bank"
    needs_logprobs = False

    def __init__(self, bank: SampleBank) -> None:
        self._scores: dict[str, dict[str, float | None]] = {}
        for entry in bank.entries:
            by_text = self._scores.setdefault(entry.problem.question, {})
            for s in entry.samples:
                by_text.setdefault(s.text, s.score)

    async def score(self, lm: MeteredLM, question: str, candidates: Sequence[Candidate]) -> list[float | None]:
        recorded = self._scores.get(question, {})
        return [recorded.get(c.text) for c in candidates]
