"""Best-of-N and weighted best-of-N with a pluggable outcome scorer.

Best-of-N answers with the highest-scored candidate that has an answer. Weighted best-of-N sums
scores per distinct answer (Li et al. 2023's weighted voting), which is more robust when the
scorer is noisy. Budget meaning: one generation per candidate; the scorer's own calls are
charged tokens, dollars and time. Candidates are scored batch by batch as they arrive, so a
budget that runs out mid-way still leaves scored candidates to choose from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions, sample_batches
from apportion.algorithms.stopping import StopRule
from apportion.algorithms.voting import score_tally
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError, ScoringFailed
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result
from apportion.reward.base import OutcomeScorer
from apportion.reward.self_certainty import SelfCertainty


@dataclass(frozen=True, slots=True)
class BestOfNOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    weighted: bool = False
    stopping: StopRule | None = None
    """Sample in the rule's rounds and stop when it says so (``score`` stops on a well-scored candidate)."""


class _BestOfNName:
    """``BestOfN.name``: "best-of-n" on the class and on plain instances, "weighted-best-of-n" on weighted ones.

    ``Algorithm.name`` is a class variable; a descriptor lets the one class carry both names without assigning
    to it per instance.
    """

    def __get__(self, obj: BestOfN | None, owner: type[BestOfN] | None = None) -> str:
        return "weighted-best-of-n" if obj is not None and obj.options.weighted else "best-of-n"


class BestOfN(Algorithm):
    name = _BestOfNName()

    def __init__(self, options: BestOfNOptions | None = None, *, scorer: OutcomeScorer | None = None,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or BestOfNOptions()
        self.scorer = scorer or SelfCertainty()

    def options_dict(self) -> dict[str, object]:
        return {**super().options_dict(), "scorer": self.scorer.name}

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options.sampling
        if self.scorer.needs_logprobs and not (opts.logprobs and lm.capabilities.logprobs):
            raise ConfigError(
                f"scorer {self.scorer.name!r} needs token log-probabilities, which backend "
                f"{lm.name} ({lm.model}) does not return; use the judge scorer instead"
            )
        ctx = self.context(lm, prompt, budget, seed, opts.system_prompt)
        await ctx.apply_prompt_mode(opts.prompt_mode)
        candidates = [c for c in prior if c.score is not None]
        unscored = [c for c in prior if c.score is None]  # drawn by a strategy that scores nothing
        if unscored:
            candidates.extend(await self._scored(ctx, unscored))
        if ctx.error is None:
            async for batch in sample_batches(ctx, opts, self.options.stopping, lambda: candidates):
                candidates.extend(await self._scored(ctx, batch))
                yield self._select(ctx, candidates, final=False)
                if ctx.error is not None:
                    break
        yield self._select(ctx, candidates, final=True)

    async def _scored(self, ctx: RunContext, batch: Sequence[Candidate]) -> list[Candidate]:
        try:
            scores = await self.scorer.score(ctx.lm, ctx.question, batch)
        except ScoringFailed as exc:  # the candidates and the scores had are kept; the run ends
            scores = exc.scores
            ctx.fail(exc)
        return [replace(c, score=s) for c, s in zip(batch, scores)]

    def _select(self, ctx: RunContext, candidates: Sequence[Candidate], final: bool) -> Result:
        t, fell_back = score_tally(candidates, ctx.equivalence, weighted=self.options.weighted)
        if fell_back and candidates and final:
            ctx.notes.append("no candidate with an answer could be scored: fell back to majority vote")
        return self._result(ctx, t.winner, t.winner_index, t.candidates, t.distribution, final)

    def _result(self, ctx: RunContext, answer: str | None, index: int | None,
                candidates: Sequence[Candidate], distribution: dict[str, float], final: bool) -> Result:
        response = candidates[index].text if index is not None else None
        return ctx.result(answer=answer, response=response, candidates=candidates,
                          distribution=distribution, final=final)
