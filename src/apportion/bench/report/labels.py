"""Placing the labels of the frontier's points on the Pareto plot, where they cover no point, no other
label and no step of the frontier line, and stay inside the axes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from apportion.bench.report.curves import point_label
from apportion.bench.report.frontier import _placed_tokens
from apportion.bench.report.summary import Row

# Where a frontier label may sit: (offset in points from its point, alignment), in order of preference.
# Nothing lies up and to the left of a frontier point, so that comes first; the nearby spots serve when
# neighbours crowd it, the distant ones (joined to their point by a leader line) when the frontier is dense.
NEAR_SPOTS = (
    ((-5, 5), "right", "bottom"),
    ((-8, 0), "right", "center"),
    ((0, 9), "center", "bottom"),
    ((6, -6), "left", "top"),
    ((6, 5), "left", "bottom"),
    ((0, -9), "center", "top"),
)
FAR_SPOTS = (
    ((-24, 18), "right", "bottom"),
    ((24, -18), "left", "top"),
    ((-36, 0), "right", "center"),
    ((0, 30), "center", "bottom"),
    ((0, -30), "center", "top"),
    ((-24, -18), "right", "top"),
    ((30, 14), "left", "bottom"),
    ((-40, 36), "right", "bottom"),
    ((40, -36), "left", "top"),
)


def _label_frontier(fig: Figure, ax: Axes, frontier: Sequence[Row], points: Sequence[tuple[float, float]],
                    x_of: Callable[[Row], float] = _placed_tokens, steps: bool = True) -> None:
    """Label each frontier point at the first spot that covers no point, no other label and stays in the axes.

    ``x_of`` places a row on the x axis (mean tokens unless told); ``steps``: the frontier is drawn as a
    step line, whose segments the labels keep clear of too.

    Where every spot collides, the one covering least wins: a label overlapping a little beats a missing one,
    and the HTML page lists the frontier in full anyway.
    """
    fig.draw_without_rendering()
    # freeze the layout, so that the pixel positions measured here are those saved
    fig.set_layout_engine("none")
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg), "the plots are drawn on the Agg canvas (plots._figure)"
    renderer = canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [Bbox.from_extents(x - 5, y - 5, x + 5, y + 5) for x, y in ax.transData.transform(points)]
    if steps:
        taken += _step_boxes(ax, frontier, x_of)
    # from the top down: a crowded lower neighbour then takes a spot below its upper one, which reads right
    for row in reversed(frontier):
        best: tuple[float, Annotation, Bbox] | None = None
        for spot in (*NEAR_SPOTS, *FAR_SPOTS):
            label = _frontier_label(ax, row, x_of(row), spot, leader=spot in FAR_SPOTS)
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer).padded(2)  # the text alone, not its leader line
            cost = _covered(box, taken) + 100 * (box.width * box.height - _area(Bbox.intersection(box, inside)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        if best is not None:
            taken.append(best[2])


def _frontier_label(ax: Axes, row: Row, x: float, spot: tuple[tuple[int, int], str, str], leader: bool) -> Annotation:
    offset, ha, va = spot
    arrow = {"arrowstyle": "-", "color": "#777777", "linewidth": 0.7, "shrinkA": 0, "shrinkB": 4} if leader else None
    return ax.annotate(point_label(row), (x, row.accuracy), xytext=offset, textcoords="offset points",
                       ha=ha, va=va, fontsize=9, arrowprops=arrow, zorder=5,
                       bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def _step_boxes(ax: Axes, frontier: Sequence[Row], x_of: Callable[[Row], float]) -> list[Bbox]:
    """Thin boxes around the segments of the frontier's step line, which labels should not hide either."""
    if len(frontier) < 2:
        return []
    corners = ax.transData.transform([(x_of(r), r.accuracy) for r in frontier])
    boxes = []
    for (x0, y0), (x1, y1) in itertools.pairwise(corners):
        boxes.append(Bbox.from_extents(x0, y0 - 2, x1, y0 + 2))  # along, at the lower accuracy
        boxes.append(Bbox.from_extents(x1 - 2, y0, x1 + 2, y1))  # then up to the next point
    return boxes


def _covered(box: Bbox, taken: Sequence[Bbox]) -> float:
    return sum(_area(Bbox.intersection(box, t)) for t in taken)


def _area(box: Bbox | None) -> float:
    return 0.0 if box is None else box.width * box.height


def _pad_log_x(ax: Axes, left: float) -> None:
    # room on the left for the labels of the cheapest frontier points, which sit to their left
    low, high = ax.get_xlim()
    span = math.log10(high) - math.log10(low)
    ax.set_xlim(10 ** (math.log10(low) - left * span / 2), high)
