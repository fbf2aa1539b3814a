"""The Pareto frontier: the points with the best accuracy for at most that many tokens."""

from __future__ import annotations

from collections.abc import Sequence

from apportion.bench.pareto import non_dominated
from apportion.bench.report.summary import Row


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, value) points no other point beats: none costs no more and is worth more.

    Returned in order of increasing cost (so of increasing value). A point that merely ties another
    on value at a higher cost is dominated; of exact duplicates only the first is kept, so each
    frontier step has one label. Points with a non-finite coordinate are ignored. The two-axis case of
    ``bench.pareto.non_dominated``, value negated since it is to be large.
    """
    return non_dominated([(cost, -value) for cost, value in points])


def frontier_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows on the accuracy-for-tokens frontier; rows without a token count cannot be placed."""
    placed = [r for r in rows if _plottable_tokens(r)]
    return [placed[i] for i in pareto_frontier([(_placed_tokens(r), r.accuracy) for r in placed])]


def _plottable_tokens(row: Row) -> bool:
    # a log axis cannot show zero, and a row without tokens has no place on a tokens axis
    return row.tokens is not None and row.tokens > 0


def _placed_tokens(row: Row) -> float:
    """The mean tokens of a row placed on a tokens axis, which only rows passing ``_plottable_tokens`` are."""
    assert row.tokens is not None and row.tokens > 0, f"{row.system} {row.algorithm}@{row.budget} has no tokens"
    return row.tokens
