"""The PNG plots: accuracy against budget and against tokens, stopping rules, accuracy by level (the Pareto
frontier's is in ``pareto_plot``).

Drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from apportion.bench.report.curves import Curve
from apportion.bench.report.frontier import _plottable_tokens
from apportion.bench.report.stopping import StopFigure, uniform_curves
from apportion.bench.report.summary import OraclePoint, Row, Summary, _subtitle

DPI = 120


def _figure(width: float = 10.0, height: float = 5.6) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    # %g: 35% rather than 35.0%, yet 22.5% where the ticks are that fine
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 6):g}%"))
    return fig, ax


def _finish(fig: Figure, ax: Axes, summary: Summary, title: str, path: Path,
            handles: Sequence[Artist] | None = None) -> Path:
    _decorate(fig, ax, summary, title, handles)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _decorate(fig: Figure, ax: Axes, summary: Summary, title: str, handles: Sequence[Artist] | None = None) -> None:
    fig.suptitle(title, fontweight="bold")
    ax.set_title(_subtitle(summary), color="#444444")
    if handles is None:
        handles = ax.get_legend_handles_labels()[0]
    if handles:
        # below the axes: curves at high budgets cluster in the top right, where a legend would sit, and a
        # legend at the side would crowd the title
        _legend_below(fig, handles)
    _clamp_percent_axis(ax)


def _legend_below(fig: Figure, handles: Sequence[Artist]) -> None:
    labels = [str(h.get_label()) for h in handles]
    columns = _legend_columns(labels)
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, frameon=False)
    # the figure grows by the legend's rows, so that many rows (a stop row per rule and algorithm)
    # sit under the axes instead of squeezing them
    rows = -(-len(labels) // columns)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.24 * max(0, rows - 2))


def _legend_columns(labels: Sequence[str], width_chars: int = 150) -> int:
    # one row when it fits the figure's width, else as many columns as the longest label allows
    if sum(len(label) + 8 for label in labels) <= width_chars:
        return max(1, len(labels))
    return max(1, min(3, width_chars // (max(len(label) for label in labels) + 8)))


def _clamp_percent_axis(ax: Axes, min_span: float = 0.1) -> None:
    low, high = ax.get_ylim()
    # a lone point or a flat curve would otherwise get a hair-thin axis of repeated tick labels
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    ax.set_ylim(max(low, -0.02), min(high, 1.02))


def _line_style(curve: Curve) -> str:
    # peers dashed, so our curves and theirs separate even in greyscale
    return "--" if curve.peer else "-"


def _plot_curves(ax: Axes, curves: Sequence[Curve], x_of: Callable[[Row], float | None]) -> None:
    # overlapping bands add up to mud, so each grows fainter as curves multiply; a thin edge keeps it traceable
    band_alpha = max(0.06, 0.36 / (len(curves) + 1))
    for curve in curves:
        placed = [(x, r) for r in curve.rows if (x := x_of(r)) is not None]
        if not placed:
            continue
        ax.plot([x for x, _ in placed], [r.accuracy for _, r in placed], linestyle=_line_style(curve),
                marker=curve.marker, color=curve.color, label=curve.label, linewidth=1.8, markersize=6, zorder=3)
        banded = [(x, r.ci_low, r.ci_high) for x, r in placed if r.ci_low is not None and r.ci_high is not None]
        bx = [x for x, _, _ in banded]
        lows, highs = [low for _, low, _ in banded], [high for _, _, high in banded]
        if len(banded) >= 2:
            ax.fill_between(bx, lows, highs, color=curve.color, alpha=band_alpha, linewidth=0)
            for edge in (lows, highs):
                ax.plot(bx, edge, color=curve.color, alpha=0.45, linewidth=0.6, linestyle=_line_style(curve))
        elif banded:
            ax.vlines(bx, lows, highs, color=curve.color, alpha=0.5)


def plot_accuracy_vs_budget(summary: Summary, curves: Sequence[Curve], path: Path) -> Path:
    fig, ax = _figure()
    # a stopping rule's row sits at the generations it used, not at the budget it was allowed
    _plot_curves(ax, curves, lambda r: r.mean_generations)
    budgets = sorted({r.budget for c in curves for r in c.rows})
    ax.set_xscale("log", base=2)
    # every budget gets a tick when they are few (the usual powers of two); many would overprint
    ax.set_xticks(budgets if len(budgets) <= 12 else [2**k for k in range(int(math.log2(budgets[-1])) + 1)])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("budget (generations per question, log scale)" if not any(r.stop_rule for c in curves for r in c.rows)
                  else "generations per question (the budget; a stopping rule's: the mean it used), log scale")
    ax.set_ylabel("accuracy (shaded: 95% CI over questions)")
    return _finish(fig, ax, summary, "Accuracy vs budget", path)


def plot_accuracy_vs_tokens(summary: Summary, curves: Sequence[Curve], path: Path) -> Path:
    fig, ax = _figure()
    _plot_curves(ax, curves, lambda r: r.tokens if _plottable_tokens(r) else None)
    _log_tokens_axis(ax)
    ax.set_ylabel("accuracy (shaded: 95% CI over questions)")
    return _finish(fig, ax, summary, "Accuracy vs tokens spent", path)


def _log_tokens_axis(ax: Axes) -> None:
    ax.set_xscale("log")
    # 1-2-5 ticks with plain numbers: a decade rarely fits more than two powers of ten
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("mean tokens per question (input + output, log scale)")


def plot_stopping(summary: Summary, figures: Sequence[StopFigure], path: Path) -> Path | None:
    """Stopping rules as points beside the uniform curves they stop early, under the oracle ceiling
    (pass@k), against mean generations and, where the rows have token counts, mean tokens."""
    if not figures:
        return None
    uniform = uniform_curves(figures)
    tokens = all(_plottable_tokens(f.row) for f in figures) and all(
        _plottable_tokens(r) for c in uniform for r in c.rows)
    fig = Figure(figsize=(12.0, 5.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True) if tokens else [fig.add_subplot()]
    panels: list[tuple[Axes, Callable[[Row], float | None], Callable[[OraclePoint], float | None]]] = [
        (axes[0], lambda r: r.mean_generations, lambda p: float(p.budget))]
    if tokens:
        panels.append((axes[1], lambda r: r.tokens, lambda p: p.tokens if p.tokens else None))
    handles: list[Artist] = []
    for ax, x_of, oracle_x in panels:
        ax.grid(True, which="major", alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 6):g}%"))
        oracle = [(x, p.accuracy) for p in summary.oracle if (x := oracle_x(p)) is not None]
        points: list[Artist] = []
        if oracle:
            ax.plot([x for x, _ in oracle], [y for _, y in oracle], color="black", linestyle="--",
                             linewidth=1.4, zorder=2, label="oracle ceiling: pass@k (any of the first k right)")
        _plot_curves(ax, uniform, x_of)
        for f in figures:
            x = x_of(f.row)
            if x is None:
                continue
            ax.errorbar([x], [f.row.accuracy], yerr=_yerr(f.row), fmt=f.curve.marker, color=f.curve.color,
                        markersize=9, markeredgecolor="black", markeredgewidth=0.6, capsize=3, zorder=5)
            points.append(Line2D([], [], linestyle="none", marker=f.curve.marker, color=f.curve.color,
                                 markeredgecolor="black", markersize=8, label=f.curve.label))
        if not handles:  # both panels show the same things: one legend for the figure
            handles = [*ax.get_legend_handles_labels()[0], *points]
        _clamp_percent_axis(ax)
    generations_ax = panels[0][0]
    generations_ax.set_xscale("log", base=2)
    generations_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    generations_ax.set_xlabel("mean generations per question (log scale)")
    generations_ax.set_ylabel("accuracy")
    if tokens:
        _log_tokens_axis(panels[1][0])
    fig.suptitle("Stopping rules beside uniform sampling, under the oracle ceiling", fontweight="bold")
    generations_ax.set_title(_subtitle(summary), color="#444444")
    _legend_below(fig, handles)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _yerr(row: Row) -> list[list[float]] | None:
    if row.ci_low is None or row.ci_high is None:
        return None
    return [[max(0.0, row.accuracy - row.ci_low)], [max(0.0, row.ci_high - row.accuracy)]]


def plot_by_level(summary: Summary, curves: Sequence[Curve], path: Path) -> Path | None:
    picks: list[tuple[Curve, Row]] = []
    for c in curves:
        largest = max((r for r in c.rows if r.by_level), key=lambda r: r.budget, default=None)
        if largest is not None:
            picks.append((c, largest))
    if not picks:
        return None
    levels = sorted({lv for _, r in picks for lv in r.by_level}, key=_level_key)
    fig, ax = _figure()
    positions = range(len(levels))
    for curve, row in picks:
        ys = [row.by_level[lv].accuracy if lv in row.by_level else math.nan for lv in levels]
        ax.plot(positions, ys, linestyle=_line_style(curve), marker=curve.marker, color=curve.color,
                label=f"{curve.label} @{row.budget}", linewidth=1.8, markersize=6)
    ax.set_xticks(list(positions), [_level_tick(lv, [r for _, r in picks]) for lv in levels])
    ax.set_xlabel("level (questions)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    return _finish(fig, ax, summary, "Accuracy by level, at each curve's largest budget", path)


def _level_key(level: str) -> tuple[int, float, str]:
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def _level_tick(level: str, rows: Sequence[Row]) -> str:
    counts = {r.by_level[level].questions for r in rows if level in r.by_level} - {None}
    return f"{level}\n(n={counts.pop()})" if len(counts) == 1 else level
