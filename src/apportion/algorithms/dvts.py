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

from apportion.algorithms.steps import (
    ROOT,
    Path,
    SearchAlgorithm,
    SearchOptions,
    best_first,
    search_result,
    split,
    start_search,
)
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result

DVTSOptions = SearchOptions
"""The search's options (``steps.SearchOptions``: the same for beam search and DVTS)."""


class DVTS(SearchAlgorithm):
    name = "dvts"

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
