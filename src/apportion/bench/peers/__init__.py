"""Peers side by side: other libraries' own implementations of the same algorithms, run against
the same endpoint, model, questions and budgets, and put in the same rows as ours.

The endpoint is either a replay of the run's bank (identical samples for everyone; repeated over
several orders) or the live server the run used. Peers are optional extras, imported only here;
a peer that is missing or fails is reported with its error, never dropped in silence.

A peer module offers ``ALGORITHMS`` (our names it implements), ``available()``, ``scorer``,
``fixed_budget``, ``unwrap``, ``rewrite_body``, ``needs_search``, ``refuses`` and ``answer(algorithm,
base_url, model, problems, budget, sampling, *, seed, concurrency, search, on_reply)``: one
``PeerReply`` per problem, each also handed to ``on_reply`` as it comes. Step-wise searches get
``search`` (our process scorer and search settings, ``PeerSearch``). On the live server each
reply's outcome goes to the run's journal as it comes, and a resumed run asks a peer only the
questions its cell has not finished.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from apportion.algorithms.base import SamplingOptions
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import read_answer
from apportion.banks import Problem
from apportion.bench.grid import Progress, QuestionOutcome, Row, canonical, make_row
from apportion.bench.judging import Judge, make_judge
from apportion.bench.peers import its_hub, optillm
from apportion.bench.peers.endpoint import PeerEndpoint
from apportion.bench.peers.reply import SCORER_REQUESTS, PeerReply, PeerSearch
from apportion.errors import ConfigError
from apportion.lm.base import Backend

if TYPE_CHECKING:
    from apportion.bench.journal import LiveJournal

__all__ = ["PEERS", "PeerReply", "PeerRun", "PeerSearch", "peer", "peer_rows"]

PEERS: dict[str, ModuleType] = {"its_hub": its_hub, "optillm": optillm}


def peer(name: str) -> ModuleType:
    key = name.lower().replace("-", "_")
    if key not in PEERS:
        raise ConfigError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    return PEERS[key]


@dataclass
class PeerRun:
    """What to run peers on. ``endpoint_backend(order)`` makes a fresh backend for each order (a
    replay with that order's seed, or the live server); ``mode`` names which."""

    endpoint_backend: Callable[[int], Backend]
    mode: str
    orders: int
    sampling: SamplingOptions
    seed: int = 0
    concurrency: int = 4
    failures: list[str] = field(default_factory=list)
    judge: str = "gold"
    """How replies are judged (``bench.judging``)."""
    search: PeerSearch | None = None
    """The process scorer and settings a peer's step-wise search runs with (None: none given)."""


async def peer_rows(name: str, algorithms: Sequence[str], budgets: Sequence[int], problems: Sequence[Problem],
                    run: PeerRun, *, equivalence: Equivalence | None = None, progress: Progress | None = None,
                    journal: LiveJournal | None = None) -> list[tuple[Row, list[QuestionOutcome]]]:
    """Each algorithm the peer implements at each budget; ``journal`` (live runs, one order)
    keeps each question's outcome as it comes and holds those of a cut-off run, not asked again."""
    module = peer(name)
    why_not = module.available()
    if why_not is not None:
        run.failures.append(f"{name}: {why_not}")
        return []
    if journal is not None and run.orders != 1:
        raise ConfigError("a journal keeps live peer cells, which run one order")
    judge = make_judge(run.judge, equivalence or Equivalence())
    out = []
    for algorithm in (canonical(a) for a in algorithms):
        if algorithm not in module.ALGORITHMS:
            run.failures.append(f"{name}: no implementation of {algorithm} (it has {', '.join(module.ALGORITHMS)})")
            continue
        if module.needs_search(algorithm) and run.search is None:
            run.failures.append(f"{name} {algorithm}: a step-wise search needs a process scorer (--process-scorer)")
            continue
        fixed = module.fixed_budget(algorithm)
        cell_budgets = [fixed] if fixed is not None else list(budgets)
        for done, budget in enumerate(cell_budgets, start=1):
            why = module.refuses(algorithm, budget, run.search)
            if why is not None:
                run.failures.append(f"{name} {algorithm} @{budget}: {why}")
                continue
            cell = await _cell(name, module, algorithm, budget, problems, run, judge, journal)
            if cell is not None:
                out.append(cell)
            if progress is not None:
                progress(f"{name} {algorithm}", done, len(cell_budgets))
    return out


async def _cell(name: str, module: ModuleType, algorithm: str, budget: int, problems: Sequence[Problem],
                run: PeerRun, judge: Judge, journal: LiveJournal | None) -> tuple[Row, list[QuestionOutcome]] | None:
    per_order: list[list[QuestionOutcome]] = []
    wall = 0.0
    refused = 0
    key = (name, algorithm, budget)
    done = journal.done(key) if journal is not None else {}
    todo = [p for p in problems if p.id not in done]
    for order in range(run.orders):
        backend = run.endpoint_backend(order)
        with PeerEndpoint(backend, todo, module.unwrap, module.rewrite_body) as endpoint:

            came: dict[str, QuestionOutcome] = {}

            def reply_came(index: int, reply: PeerReply, endpoint: PeerEndpoint = endpoint,
                           came: dict[str, QuestionOutcome] = came) -> None:
                # judged as it comes: the question's requests are all in the endpoint's count by now
                outcome = came[todo[index].id] = _outcome(todo[index], reply, endpoint, judge)
                if journal is not None:
                    journal.add(key, outcome)

            started = time.monotonic()
            replies = await module.answer(algorithm, endpoint.base_url, endpoint.model, todo, budget,
                                          run.sampling, seed=run.seed + order, concurrency=run.concurrency,
                                          search=run.search, on_reply=reply_came) if todo else []
            wall += time.monotonic() - started
            new = {p.id: came.get(p.id) or _outcome(p, reply, endpoint, judge) for p, reply in zip(todo, replies)}
            per_order.append([done[p.id] if p.id in done else new[p.id] for p in problems])
            refused += endpoint.counter.refused
    outcomes = _merge(per_order)
    errors = [o.error for o in outcomes if o.error]
    if refused:
        errors = [f"{e} ({refused} request(s) were for prompts the endpoint does not have: a judge's or "
                  "rater's prompts are not in a bank; run live peers with --peer-endpoint live)" for e in errors]
    if len(errors) == len(outcomes):
        run.failures.append(f"{name} {algorithm} @{budget}: every question failed; first error: {errors[0]}")
        return None
    accuracies = [statistics.fmean(o.right for o in order) for order in per_order]
    notes = [f"{len(errors)} question(s) failed; first error: {errors[0]}"] if errors else []
    if run.mode == "replay":
        notes.append("wall time on a replay endpoint is the peer's own (samples come instantly)")
    if module.fixed_budget(algorithm) is not None:
        notes.append(f"{name}'s {algorithm} always draws {budget} samples; it runs at that budget only")
    if done:
        wall += sum(o.seconds or 0.0 for o in done.values()) / run.concurrency
        notes.append(f"{len(done)} of {len(problems)} question(s) were answered before a --resume: the wall time "
                     "adds their own times over the concurrency")
    scorer = module.scorer(algorithm, run.search)
    row = make_row(name, algorithm, scorer, budget, run.mode, outcomes, wall / run.orders,
                   bool(done), statistics.pstdev(accuracies) if run.orders > 1 else None,
                   run.orders if run.orders > 1 else None, notes)
    return row, outcomes


def _outcome(problem: Problem, reply: PeerReply, endpoint: PeerEndpoint, judge: Judge) -> QuestionOutcome:
    """One reply's outcome: the tokens the endpoint counted for its question, its answer judged."""
    usage = endpoint.counter.usage.get(problem.id)
    tokens_in, tokens_out = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
    cached = usage.cached_input_tokens if usage else 0
    answer = read_answer(reply.text)[0] if reply.text else None
    right, shown = judge.judge(problem, answer, reply.text) if reply.error is None else (False, answer)
    search = None
    if reply.search is not None:  # the endpoint saw every request: the step requests are those the scorer did not send
        search = {k: v for k, v in reply.search.items() if k != SCORER_REQUESTS}
        search["requests"] = endpoint.counter.calls.get(problem.id, 0) - reply.search.get(SCORER_REQUESTS, 0)
    return QuestionOutcome(problem, float(right), tokens_in, tokens_out,
                           float(endpoint.counter.price.cost(tokens_in, tokens_out, cached)), shown, reply.error,
                           search=search, seconds=reply.seconds)


def _merge(per_order: list[list[QuestionOutcome]]) -> list[QuestionOutcome]:
    """Per question: the rate of being right over orders, mean tokens and dollars; the first
    order's answer and any error."""
    merged = []
    for column in zip(*per_order):
        first = column[0]
        error = next((o.error for o in column if o.error), None)
        merged.append(QuestionOutcome(
            first.problem, statistics.fmean(o.right for o in column),
            statistics.fmean(o.input_tokens for o in column), statistics.fmean(o.output_tokens for o in column),
            statistics.fmean(o.usd for o in column), first.answer, error, search=first.search,
            seconds=first.seconds))
    return merged
