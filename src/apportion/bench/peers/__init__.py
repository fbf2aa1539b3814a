"""Peers side by side: other libraries' own implementations of the same algorithms, run against
the same endpoint, model, questions and budgets, and put in the same rows as ours.

The endpoint is either a replay of the run's bank (identical samples for everyone; repeated over
several orders) or the live server the run used. Peers are optional extras, imported only here;
a peer that is missing or fails is reported with its error, never dropped in silence.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

from apportion.algorithms.base import SamplingOptions
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import read_answer
from apportion.banks import Problem
from apportion.bench.grid import Progress, QuestionOutcome, Row, canonical, make_row
from apportion.bench.peers import its_hub, optillm
from apportion.bench.peers.endpoint import PeerEndpoint
from apportion.errors import ConfigError
from apportion.lm.base import Backend

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


async def peer_rows(name: str, algorithms: Sequence[str], budgets: Sequence[int], problems: Sequence[Problem],
                    run: PeerRun, *, equivalence: Equivalence | None = None,
                    progress: Progress | None = None) -> list[tuple[Row, list[QuestionOutcome]]]:
    module = peer(name)
    why_not = module.available()
    if why_not is not None:
        run.failures.append(f"{name}: {why_not}")
        return []
    eq = equivalence or Equivalence()
    out = []
    for algorithm in (canonical(a) for a in algorithms):
        if algorithm not in module.ALGORITHMS:
            run.failures.append(f"{name}: no implementation of {algorithm} (it has {', '.join(module.ALGORITHMS)})")
            continue
        fixed = module.fixed_budget(algorithm)
        cell_budgets = [fixed] if fixed is not None else list(budgets)
        for done, budget in enumerate(cell_budgets, start=1):
            cell = await _cell(name, module, algorithm, budget, problems, run, eq)
            if cell is not None:
                out.append(cell)
            if progress is not None:
                progress(f"{name} {algorithm}", done, len(cell_budgets))
    return out


async def _cell(name: str, module: ModuleType, algorithm: str, budget: int, problems: Sequence[Problem],
                run: PeerRun, eq: Equivalence) -> tuple[Row, list[QuestionOutcome]] | None:
    per_order: list[list[QuestionOutcome]] = []
    wall = 0.0
    refused = 0
    for order in range(run.orders):
        backend = run.endpoint_backend(order)
        with PeerEndpoint(backend, problems, module.unwrap) as endpoint:
            started = time.monotonic()
            replies = await module.answer(algorithm, endpoint.base_url, endpoint.model, problems, budget,
                                          run.sampling, seed=run.seed + order, concurrency=run.concurrency)
            wall += time.monotonic() - started
            per_order.append(_outcomes(problems, replies, endpoint, eq))
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
    row = make_row(name, algorithm, module.scorer(algorithm), budget, run.mode, outcomes, wall / run.orders,
                   False, statistics.pstdev(accuracies) if run.orders > 1 else None,
                   run.orders if run.orders > 1 else None, notes)
    return row, outcomes


def _outcomes(problems: Sequence[Problem], replies: Sequence[tuple[str | None, str | None]], endpoint: PeerEndpoint,
              eq: Equivalence) -> list[QuestionOutcome]:
    price = endpoint.counter.price
    out = []
    for problem, (text, error) in zip(problems, replies):
        usage = endpoint.counter.usage.get(problem.id)
        tokens_in, tokens_out = (usage.input_tokens, usage.output_tokens) if usage else (0, 0)
        cached = usage.cached_input_tokens if usage else 0
        answer = read_answer(text)[0] if text else None
        right = answer is not None and error is None and eq.same(answer, problem.answer)
        out.append(QuestionOutcome(problem, float(right), tokens_in, tokens_out,
                                   float(price.cost(tokens_in, tokens_out, cached)), answer, error))
    return out


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
            statistics.fmean(o.usd for o in column), first.answer, error))
    return merged
