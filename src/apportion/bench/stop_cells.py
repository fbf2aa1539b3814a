"""Stopping rules evaluated on a sample bank with the code of live runs.

Through ``replay``: for each order, a ``ReplayBackend`` serves every question's recorded samples
in that order's random sequence, and the real algorithm with the rule runs on it through the
ledger: the rule sees the samples in rounds exactly as it would live. The row beside it is the same algorithm at
the bank's full size (the uniform baseline, from ``replay``); a rule's row says how much of the
bank it used and what accuracy it kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.stopping import StopRule
from apportion.answers.equivalence import Equivalence
from apportion.banks import SampleBank
from apportion.bench.grid import QuestionOutcome, Row, make_row, replay_outcomes, replay_wall
from apportion.bench.replay import replay
from apportion.budget.units import Price

STOPPABLE = ("self-consistency", "best-of-n", "weighted-best-of-n")


async def stop_cell(bank: SampleBank, algorithm: str, rule: StopRule, *, orders: int, seed: int, price: Price,
                    sampling: SamplingOptions, equivalence: Equivalence | None = None,
                    ) -> tuple[Row, list[QuestionOutcome]]:
    """One row: ``algorithm`` with ``rule`` under a budget of the bank's size, over ``orders`` orders.
    Best-of-N is scored by the bank's recorded scores where it has them, else by self-certainty."""
    name = make_algorithm(algorithm).name
    scorer = "bank" if bank.has_scores else "self-certainty"
    point, = await replay(bank, name, [bank.k], orders=orders, seed=seed, scorer=scorer, equivalence=equivalence,
                          sampling=sampling, stopping=rule)
    outcomes = replay_outcomes(bank, point.per_question, point.per_question_tokens, point.first_answers, price)
    note = (f"stopped by {rule.describe()}: {point.generations:.2f} of {bank.k} samples per question "
            f"on average ({100 * point.generations / bank.k:.1f}%)")
    row = make_row("apportion", f"{name} --stop {rule.describe()}", point.scorer, bank.k, "replay", outcomes,
                   replay_wall(bank, outcomes), True, point.accuracy_std if orders > 1 else None, orders, [note],
                   generations=point.generations)
    return row, outcomes


def stoppable(algorithms: Sequence[str]) -> list[str]:
    return [a for a in algorithms if make_algorithm(a).name in STOPPABLE]
