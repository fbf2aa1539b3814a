"""Self-certainty from the sampler's own log-probabilities: no extra model, no extra spend.

The score is the geometric mean of the sampled tokens' probabilities, exp(mean log p): the
mean token log-probability mapped into [0, 1] so that weighted voting can sum it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from apportion.lm.metered import MeteredLM
from apportion.result import Candidate


class SelfCertainty:
    name = "self-certainty"
    needs_logprobs = True

    async def score(self, lm: MeteredLM, question: str,
                    candidates: Sequence[Candidate]) -> list[float | None]:
        return [None if c.mean_logprob is None else math.exp(c.mean_logprob) for c in candidates]
