"""The Pareto plot: every configuration by cost and accuracy and, where the rows have wall times, by latency
in a second panel; the frontier over all of them (``bench.pareto``) solid, the rest faded, and the utility
winner starred with its accuracy interval."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from apportion.bench.pareto import Pareto, Point
from apportion.bench.report.curves import Curve, point_label
from apportion.bench.report.labels import _label_frontier, _pad_log_x
from apportion.bench.report.plots import DPI, _decorate, _log_tokens_axis, _yerr
from apportion.bench.report.summary import Summary

PER = {"tokens": "1k tokens", "usd": "dollar", "generations": "generation"}
WINNER_STYLE: dict[str, Any] = {"marker": "*", "color": "gold", "markeredgecolor": "black", "markeredgewidth": 0.9}


def plot_pareto(summary: Summary, curves: Sequence[Curve], result: Pareto, path: Path) -> Path:
    fig = Figure(figsize=(12.0 if result.latency else 10.0, 5.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes: list[Axes] = list(fig.subplots(1, 2, sharey=True)) if result.latency else [fig.add_subplot()]
    placed = {id(p.row): p for p in result.points}
    panels: list[tuple[Axes, Callable[[Point], float]]] = [(axes[0], lambda p: p.cost)]
    if result.latency:
        panels.append((axes[1], _seconds))
    handles: list[Artist] = []
    for ax, x_of in panels:
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 6):g}%"))
        handles = _scatter(ax, curves, result, placed, x_of)
        _mark_winner(ax, result.winner, x_of(result.winner))
        ax.margins(y=0.1)  # headroom for the labels of the top frontier points
    if not result.latency:
        # over two axes the frontier is a staircase: the best accuracy for at most that cost
        xs = [p.cost for p in result.frontier]
        ys = [p.row.accuracy for p in result.frontier]
        right = max(p.cost for p in result.points)
        handles += axes[0].step([*xs, right], [*ys, ys[-1]], where="post", color="black", linewidth=1.4, zorder=2,
                                label="Pareto frontier")
    else:
        handles.append(Line2D([], [], linestyle="none", marker="o", color="grey", markeredgecolor="black",
                              label="on the frontier of cost, latency and accuracy (solid); dominated (faded)"))
    handles.append(Line2D([], [], linestyle="none", markersize=14, label=_winner_label(result), **WINNER_STYLE))
    _cost_axis(axes[0], result)
    if result.latency:
        _latency_axis(axes[1], result)
    axes[0].set_ylabel("accuracy")
    title = ("Cost, latency and accuracy: Pareto frontier and utility winner" if result.latency
             else f"Accuracy for {result.cost.name}: Pareto frontier and utility winner")
    _decorate(fig, axes[0], summary, title, handles)
    points = [(p.cost, p.row.accuracy) for p in result.points]
    _label_frontier(fig, axes[0], [p.row for p in result.frontier], points, x_of=lambda r: placed[id(r)].cost,
                    steps=not result.latency)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _scatter(ax: Axes, curves: Sequence[Curve], result: Pareto, placed: dict[int, Point],
             x_of: Callable[[Point], float]) -> list[Artist]:
    # rows tied exactly with a frontier point are on the frontier as much as it is
    on_frontier = {i for p in result.frontier for i in (p.index, *p.ties)}
    handles: list[Artist] = []
    for curve in curves:
        points = [placed[id(r)] for r in curve.rows if id(r) in placed]
        if not points:
            continue
        # dominated points faded and underneath, so the eye goes to the frontier, also where points tie
        for top, alpha, zorder in ((False, 0.35, 3), (True, 1.0, 4)):
            chosen = [p for p in points if (p.index in on_frontier) == top]
            ax.scatter([x_of(p) for p in chosen], [p.row.accuracy for p in chosen], marker=curve.marker,
                       color=curve.color, alpha=alpha, s=42, zorder=zorder,
                       edgecolors="black" if top else "none", linewidths=0.5)
        # the scatter's own legend entry would take the alpha of its first point, often a faded one
        handles.append(Line2D([], [], linestyle="none", marker=curve.marker, color=curve.color, label=curve.label))
    return handles


def _seconds(p: Point) -> float:
    assert p.latency is not None, "latency is an axis only where every row has a wall time"
    return p.latency


def _mark_winner(ax: Axes, winner: Point, x: float) -> None:
    ax.errorbar([x], [winner.row.accuracy], yerr=_yerr(winner.row), fmt="none", ecolor="black", capsize=4,
                linewidth=1.2, zorder=5)
    ax.plot([x], [winner.row.accuracy], linestyle="none", markersize=17, zorder=6, **WINNER_STYLE)


def _winner_label(result: Pareto) -> str:
    w, unit = result.weights, result.cost
    terms = [f"{w.cost:g} per {PER[unit.name]}"] if w.cost else []
    terms += [f"{w.latency:g} per second"] if w.latency else []
    weights = f"100·accuracy − {' − '.join(terms)}" if terms else "100·accuracy, no weights"
    text = f"utility winner {point_label(result.winner.row)}, U = {result.winner.utility:.1f} pp ({weights})"
    if result.separated is False:
        text += "; its 95% CI overlaps the runner-up's"
    return text


def _cost_axis(ax: Axes, result: Pareto) -> None:
    costs = [p.cost for p in result.points]
    if result.cost.name == "tokens":
        _log_tokens_axis(ax)
        _pad_log_x(ax, left=0.35)
        return
    if result.cost.name == "generations":
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("mean generations per question (log scale)")
        _pad_log_x(ax, left=0.35)
        return
    # dollars: a free local model costs 0, which a log axis cannot show
    if min(costs) > 0:
        ax.set_xscale("log")
        _pad_log_x(ax, left=0.35)
    else:
        # no negative dollars: the axis starts just left of 0, and a run that cost nothing gets a tenth of a cent
        right = 1.1 * max(costs) or 0.001
        ax.set_xlim(-0.25 * right, right)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:.2g}" if v >= 0 else ""))
    ax.set_xlabel("mean dollars per question" + (" (log scale)" if min(costs) > 0 else ""))


def _latency_axis(ax: Axes, result: Pareto) -> None:
    ax.set_xscale("log")
    # 1-2-5 ticks with plain numbers, as on the tokens axis
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    estimated = any(p.row.wall_estimated for p in result.points)
    ax.set_xlabel("wall seconds per question (log scale" + ("; replayed rows: estimated)" if estimated else ")"))
