"""Stopping rules evaluated on a sample bank with the code of live runs.

For each order, a ``ReplayBackend`` serves every question's recorded samples in that order's
random sequence, and the real algorithm with the rule runs on it through the ledger: the rule
sees the samples in rounds exactly as it would live. The row beside it is the same algorithm at
the bank's full size (the uniform baseline, from ``replay``); a rule's row says how much of the
bank it used and what accuracy it kept.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.stopping import StopRule
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.bench.grid import QuestionOutcome, Row, bank_prompt, make_row, replay_outcomes, replay_wall
from apportion.budget.units import Budget, Price
from apportion.lm.replay import ReplayBackend
from apportion.reward.base import OutcomeScorer
from apportion.reward.recorded import RecordedScorer
from apportion.reward.self_certainty import SelfCertainty

STOPPABLE = ("self-consistency", "best-of-n", "weighted-best-of-n")


async def stop_cell(bank: SampleBank, algorithm: str, rule: StopRule, *, orders: int, seed: int, price: Price,
                    sampling: SamplingOptions, equivalence: Equivalence | None = None,
                    ) -> tuple[Row, list[QuestionOutcome]]:
    """One row: ``algorithm`` with ``rule`` under a budget of the bank's size, over ``orders`` orders.
    Best-of-N is scored by the bank's recorded scores where it has them, else by self-certainty."""
    eq = equivalence or Equivalence()
    scorer: OutcomeScorer = RecordedScorer(bank) if bank.has_scores else SelfCertainty()
    sampling = _for_bank(sampling, bank)
    right: list[list[float]] = [[] for _ in bank.entries]
    tokens: list[list[int]] = [[] for _ in bank.entries]
    used: list[int] = []
    answers: list[str | None] = []
    for order in range(orders):
        backend = ReplayBackend(bank, seed=seed + order, price=price)
        for q, entry in enumerate(bank.entries):
            algo = make_algorithm(algorithm, sampling, scorer, rule)
            algo.equivalence = eq
            result = await algo.run(backend, bank_prompt(entry.problem, sampling), Budget(generations=bank.k),
                                    seed=seed + order)
            ok = result.answer is not None and eq.same(result.answer, entry.problem.answer)
            right[q].append(float(ok))
            tokens[q].append(result.spent.output_tokens)
            used.append(result.spent.generations)
            if order == 0:
                answers.append(result.answer)
    outcomes = replay_outcomes(bank, [statistics.fmean(r) for r in right], [statistics.fmean(t) for t in tokens],
                               answers, price)
    per_order = [statistics.fmean(r[o] for r in right) for o in range(orders)]
    name = make_algorithm(algorithm).name
    note = (f"stopped by {rule.describe()}: {statistics.fmean(used):.2f} of {bank.k} samples per question "
            f"on average ({100 * statistics.fmean(used) / bank.k:.1f}%)")
    row = make_row("apportion", f"{name} --stop {rule.describe()}", None if name == "self-consistency" else
                   scorer.name, bank.k, "replay", outcomes, replay_wall(bank, outcomes), True,
                   statistics.pstdev(per_order) if orders > 1 else None, orders, [note],
                   generations=statistics.fmean(used))
    return row, outcomes


def _for_bank(sampling: SamplingOptions, bank: SampleBank) -> SamplingOptions:
    """Log-probabilities asked for only where the bank has them."""
    return replace(sampling, logprobs=sampling.logprobs and bank.has_logprobs)


def stoppable(algorithms: Sequence[str]) -> list[str]:
    return [a for a in algorithms if make_algorithm(a).name in STOPPABLE]
