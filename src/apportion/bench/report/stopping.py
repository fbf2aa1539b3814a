"""Stopping rules' rows (``apportion bench --stop``) beside the uniform curve they stop early.

A rule's row is one point: the algorithm run under the bank's full budget with the rule, at its
mean generations and tokens per question. It is set beside the same algorithm's uniform curve
(every budget spent) and under the oracle ceiling (pass@k), and measured by the share of the
full budget's output tokens it used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apportion.bench.report.curves import Curve
from apportion.bench.report.summary import OraclePoint, Row, Summary


@dataclass(frozen=True, slots=True)
class StopFigure:
    """One stopping rule's row with what it is measured against."""

    row: Row
    curve: Curve
    uniform: Curve | None
    """The same system and algorithm spending every budget (None where the run has no such curve)."""
    full_output_tokens: float | None
    """Mean output tokens per question of uniform sampling at the row's budget: the uniform row's,
    else the oracle's (the same samples, all of them); None where neither is known."""
    oracle: OraclePoint | None
    """pass@k at the row's budget."""

    @property
    def uniform_row(self) -> Row | None:
        """The uniform curve's row at the rule's budget (its full budget)."""
        if self.uniform is None:
            return None
        return next((r for r in self.uniform.rows if r.budget == self.row.budget), None)

    @property
    def generation_share(self) -> float:
        return self.row.mean_generations / self.row.budget

    @property
    def token_share(self) -> float | None:
        """Output tokens used over the full budget's; None without token counts (never 0/0)."""
        if self.full_output_tokens is None or self.full_output_tokens <= 0 or self.row.output_tokens is None:
            return None
        return self.row.output_tokens / self.full_output_tokens


def stop_figures(summary: Summary, curves: Sequence[Curve]) -> list[StopFigure]:
    figures = []
    for curve in curves:
        for row in curve.rows:
            if row.stop_rule is None:
                continue
            uniform = _uniform_curve(row, curves)
            oracle = next((p for p in summary.oracle if p.budget == row.budget), None)
            at_budget = next((r for r in uniform.rows if r.budget == row.budget), None) if uniform else None
            full = at_budget.output_tokens if at_budget is not None else None
            if full is None and oracle is not None:
                full = oracle.output_tokens
            figures.append(StopFigure(row, curve, uniform, full, oracle))
    return figures


def uniform_curves(figures: Sequence[StopFigure]) -> list[Curve]:
    """The distinct uniform curves the rules stand beside, in order of first appearance."""
    seen: dict[int, Curve] = {}
    for f in figures:
        if f.uniform is not None:
            seen.setdefault(id(f.uniform), f.uniform)
    return list(seen.values())


def _uniform_curve(row: Row, curves: Sequence[Curve]) -> Curve | None:
    """The curve of the same system and algorithm without a rule; of several (scorers, modes), the one
    with the row's scorer, else the first."""
    candidates = [c for c in curves if c.rows[0].stop_rule is None and c.rows[0].system == row.system
                  and c.rows[0].algorithm == row.base_algorithm]
    same_scorer = [c for c in candidates if c.rows[0].scorer == row.scorer]
    return same_scorer[0] if same_scorer else (candidates[0] if candidates else None)
