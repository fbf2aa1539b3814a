"""Self-consistency (Wang et al., 2022): sample many solutions, answer with the majority answer.

Budget meaning: one generation per sample. Tokens, dollars and seconds also bind; the loop stops
when the ledger refuses the next batch. Every batch yields an interim result (anytime).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from apportion.algorithms.base import Algorithm, SamplingOptions, sample_batches
from apportion.algorithms.stopping import StopRule
from apportion.algorithms.voting import Tally, tally
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result


@dataclass(frozen=True, slots=True)
class SelfConsistencyOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    stopping: StopRule | None = None
    """Sample in the rule's rounds and stop when it says more samples would not change the vote."""


class SelfConsistency(Algorithm):
    name = "self-consistency"

    def __init__(self, options: SelfConsistencyOptions | None = None, *,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or SelfConsistencyOptions()

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options.sampling
        ctx = self.context(lm, prompt, budget, seed, opts.system_prompt)
        await ctx.apply_prompt_mode(opts.prompt_mode)
        candidates: list[Candidate] = list(prior)

        rule = self.options.stopping
        votes: tuple[int, Tally] | None = None  # the vote over the first n candidates, kept for the final result

        def current(final: bool) -> Result:
            nonlocal votes
            if votes is None or votes[0] != len(candidates):  # candidates only grow
                # Those drawn since the last vote are in no result yet: their votes are set in place.
                drawn = len(candidates) - (votes[0] if votes is not None else len(prior))
                votes = (len(candidates), tally(candidates, ctx.equivalence,
                                                rule.vote_weights(candidates) if rule else None, fresh=drawn))
            t = votes[1]
            response = candidates[t.winner_index].text if t.winner_index is not None else None
            return ctx.result(answer=t.winner, response=response, candidates=t.candidates,
                              distribution=t.distribution, final=final)

        async for batch in sample_batches(ctx, opts, self.options.stopping, lambda: candidates):
            candidates.extend(batch)
            yield current(final=False)
        yield current(final=True)
