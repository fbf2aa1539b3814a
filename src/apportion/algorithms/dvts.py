"""Diverse Verifier Tree Search (Beeching et al. 2024, search-and-learn's DVTS).

N paths are split into N/M independent subtrees (N // M of them, at least one; N shared out as
evenly as possible, so each asks for about M). Each subtree is expanded greedily: at each search
step its live path gets M candidate next steps and keeps the best one by aggregated process
reward; the subtree ends when that best child has ended. Every subtree's requests go out
together, one round per search step (one request of n=M per subtree; at the first step all
subtrees share the empty prefix, so it is one request of n=N), and every child is scored in one
call. A child that ended without being the best is still a finished path: it is kept as a
candidate (it was paid for, and it takes part in the vote). The answer: the best aggregated score
among the paths the model ended with an answer (``vote``: the highest summed score per answer),
else among all with an answer.

Budget meaning: ``--budget N`` (generations) is N: N/M subtrees of M candidates, at most N paths
alive at once and at most N finished paths, each one generation (``algorithms/steps.py``: every
path holds its generation from the moment it is asked for). So children that finish early use up
the budget's generations, and later steps ask for fewer candidates (at least one per subtree)
rather than pass it. Steps and the process scorer's calls are charged in tokens, dollars and
seconds, never generations. With no generation limit, ``width`` is N (default 8). A search step
whose requests the budget refuses ends the search; subtrees still live end as "budget" candidates.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.steps import (
    ROOT,
    Path,
    StepOptions,
    best_first,
    check_search,
    search_result,
    split,
    start_search,
    step_sampling,
)
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result
from apportion.reward.process import ProcessScorer


@dataclass(frozen=True, slots=True)
class DVTSOptions:
    sampling: SamplingOptions = field(default_factory=step_sampling)
    """``max_tokens`` bounds a whole path's output tokens; temperature, top_p and stop as for a sample;
    the system prompt asks for steps separated by blank lines (``steps.STEP_SYSTEM_PROMPT``)."""
    steps: StepOptions = field(default_factory=StepOptions)
    beam_width: int = 4
    """M: the candidate next steps each subtree gets per search step (N // M subtrees)."""
    width: int | None = None
    """N where the budget sets no generation limit (default 8); under one, at most N of it."""
    aggregation: str = "last"
    """How a path's step scores make its score (``reward.process.AGGREGATIONS``)."""
    vote: bool = False
    """Answer with the highest summed score over paths instead of the best path's."""

    def __post_init__(self) -> None:
        check_search(self.beam_width, self.width, self.aggregation)


class DVTS(Algorithm):
    name = "dvts"

    def __init__(self, options: DVTSOptions | None = None, *, process_scorer: ProcessScorer | None = None,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or DVTSOptions()
        self.process_scorer = process_scorer

    def options_dict(self) -> dict[str, object]:
        scorer = self.process_scorer.name if self.process_scorer is not None else None
        return {**super().options_dict(), "process_scorer": scorer}

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx, search = await start_search(self, lm, prompt, budget, seed, opts.sampling, opts.steps,
                                         self.process_scorer, opts.aggregation, opts.width)
        widths = split(search.width, max(1, search.width // opts.beam_width)) if search.width else []
        subtrees: dict[int, Path] = dict.fromkeys(range(len(widths)), ROOT)  # the live path of each live subtree
        try:
            while subtrees and not search.stopped:
                order = list(subtrees)
                children = await search.step([(subtrees[g], widths[g]) for g in order])
                if not any(children):
                    break
                for g, kids in zip(order, children):
                    if not kids:
                        continue  # refused: the subtree keeps its path
                    best = min(range(len(kids)), key=lambda i: best_first(kids[i].score(opts.aggregation), i))
                    search.prune(sum(1 for i, kid in enumerate(kids) if not kid.finished and i != best))
                    if kids[best].finished:
                        del subtrees[g]
                    else:
                        subtrees[g] = kids[best]
                yield search_result(ctx, search, prior, opts.vote, final=False)
            search.finish([p for p in subtrees.values() if p.steps])
        finally:
            search.close()
        yield search_result(ctx, search, prior, opts.vote, final=True)
