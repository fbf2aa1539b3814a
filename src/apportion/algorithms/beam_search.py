"""Beam search over steps with a process reward (Snell et al. 2024; search-and-learn's fields).

N paths are searched at once. Each search step keeps the top ceil(N'/M) live paths by aggregated
process reward (``aggregation``; identical paths count once) and asks each for M next steps, all
in one round of requests (one request of n=M per kept path), where N' = N less the paths already
finished: finished paths leave the beam, kept as candidates, and the beam narrows by as many.
Fewer live paths than that share the N' children out between them. The search ends when N paths
have finished, when no path is live (every path ends by ``StepOptions.max_steps`` at the
latest), or when the budget refuses a request or the scoring; paths still live then end as
"budget" candidates. The answer: the best aggregated score among the paths the model ended with
an answer (``vote``: the answer with the highest summed score), else among all with an answer.

Budget meaning: ``--budget N`` (generations) is N: the beam holds N paths and at most N paths
finish, each one generation (``algorithms/steps.py``: a path holds its generation from the moment
it is asked for, so finished plus live paths never pass N). Steps are continuations: charged in
tokens, dollars and seconds, never generations, and so are the process scorer's calls (as
scoring). With no generation limit, ``width`` is N (default 8). Tokens, dollars and the deadline
bound every request; a search step whose requests the budget cuts short ends the search.
Round trips: one round of step requests plus one of scoring per search step.
"""

from __future__ import annotations

import math
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

BeamSearchOptions = SearchOptions
"""The search's options (``steps.SearchOptions``: the same for beam search and DVTS)."""


class BeamSearch(SearchAlgorithm):
    name = "beam-search"

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx, search = await start_search(self, lm, prompt, budget, seed, opts.sampling, opts.steps,
                                         self.process_scorer, opts.aggregation, opts.width)
        live: list[Path] = [ROOT]
        try:
            while live and search.room > 0 and not search.stopped:
                wants, pruned = self._kept(live, search.room)
                search.prune(pruned)
                children = await search.step(wants)
                if not any(children):
                    live = [p for p, _ in wants if p.steps]
                    break
                live = [c for kids in children for c in kids if not c.finished]
                live += [p for (p, _), kids in zip(wants, children) if p.steps and not kids]
                yield search_result(ctx, search, prior, opts.vote, final=False)
            search.finish([p for p in live if p.steps])
        finally:
            search.close()
        yield search_result(ctx, search, prior, opts.vote, final=True)

    def _kept(self, live: list[Path], target: int) -> tuple[list[tuple[Path, int]], int]:
        """The paths to expand (the best ceil(target / M), duplicates once) with their children
        (``target`` in all), and how many live paths are pruned."""
        how = self.options.aggregation
        ranked = sorted(range(len(live)), key=lambda i: best_first(live[i].score(how), i))
        keep = math.ceil(target / self.options.beam_width)
        chosen: list[Path] = []
        seen: set[tuple[str, ...]] = set()
        for i in ranked:
            if len(chosen) == keep:
                break
            if live[i].steps not in seen:
                seen.add(live[i].steps)
                chosen.append(live[i])
        pruned = sum(1 for p in live if p.steps) - sum(1 for p in chosen if p.steps)
        return list(zip(chosen, split(target, len(chosen)))), pruned
