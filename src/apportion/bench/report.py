"""Turn a benchmark run directory into PNG plots and one self-contained HTML page.

The input is the ``summary.json`` that ``apportion bench`` writes. Rows sharing
(system, algorithm, scorer) form one curve over budgets. The plots:

- ``accuracy_vs_budget.png``: accuracy against generations per question, 95% CI bands;
- ``accuracy_vs_tokens.png``: the same curves against mean tokens per question, the honest
  x-axis, since algorithms and peers spend very different tokens per generation;
- ``pareto.png``: every point, with the frontier of best accuracy for at most that many tokens;
- ``by_level.png``: accuracy per difficulty level at each curve's largest budget, written only
  when the dataset has levels.

``report.html`` embeds them as data URIs next to tables of the run, so the one file can be mailed
or attached to an issue. Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas,
never through pyplot, so building a report leaves no global figure state behind.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation, Text
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
from matplotlib.transforms import Bbox

from apportion.errors import ConfigError

__all__ = [
    "Curve", "LevelFigure", "ReportFiles", "Row", "Summary",
    "build_curves", "frontier_rows", "load_summary", "pareto_frontier", "point_label", "render_html", "write_report",
    "plot_accuracy_vs_budget", "plot_accuracy_vs_tokens", "plot_by_level", "plot_pareto",
]

SUMMARY_NAME = "summary.json"
SUPPORTED_VERSION = 1
HOME_SYSTEM = "apportion"
DPI = 120

# Short names for the frontier labels; an algorithm not listed keeps its full name.
ABBREVIATIONS = {"self-consistency": "SC", "best-of-n": "BoN", "weighted-best-of-n": "WBoN"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")
STYLE = {
    "font.size": 11,
    "axes.titlesize": 10,
    "axes.labelsize": 11,
    "figure.titlesize": 13,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}


@dataclass(frozen=True, slots=True)
class LevelFigure:
    """Accuracy on the questions of one difficulty level."""

    accuracy: float
    questions: int | None


@dataclass(frozen=True, slots=True)
class Row:
    """One (system, algorithm, scorer, budget) measurement; token and dollar figures are means per question."""

    system: str
    algorithm: str
    scorer: str | None
    budget: int
    mode: str
    questions: int | None
    accuracy: float
    ci_low: float | None
    ci_high: float | None
    accuracy_std: float | None
    orders: int | None
    input_tokens: float | None
    output_tokens: float | None
    tokens: float | None
    usd: float | None
    wall_seconds: float | None
    wall_estimated: bool
    errors: int
    by_level: dict[str, LevelFigure]


@dataclass(frozen=True, slots=True)
class Summary:
    version: int
    run: str
    dataset: str
    model: str
    backend: str
    created: str
    questions: int | None
    config: dict[str, Any]
    rows: tuple[Row, ...]


@dataclass(frozen=True, slots=True)
class Curve:
    """Rows of one (system, algorithm, scorer), sorted by budget, with the colour and marker every plot uses."""

    label: str
    rows: tuple[Row, ...]
    color: str
    marker: str
    peer: bool


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What ``write_report`` wrote: the page and the plots it embeds, in the page's order."""

    out_dir: Path
    html: Path
    plots: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.html, *self.plots)


# --- the frontier -----------------------------------------------------------------------------


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, value) points no other point beats: none costs no more and is worth more.

    Returned in order of increasing cost (so of increasing value). A point that merely ties another
    on value at a higher cost is dominated; of exact duplicates only the first is kept, so each
    frontier step has one label. Points with a non-finite coordinate are ignored.
    """
    finite = [i for i, (cost, value) in enumerate(points) if math.isfinite(cost) and math.isfinite(value)]
    # cheapest first; at equal cost the most valuable first, so the sweep keeps it and drops the rest
    order = sorted(finite, key=lambda i: (points[i][0], -points[i][1], i))
    frontier: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            frontier.append(i)
            best = points[i][1]
    return frontier


def frontier_rows(rows: Sequence[Row]) -> list[Row]:
    """The rows on the accuracy-for-tokens frontier; rows without a token count cannot be placed."""
    placed = [r for r in rows if _plottable_tokens(r)]
    return [placed[i] for i in pareto_frontier([(r.tokens or 0.0, r.accuracy) for r in placed])]


# --- reading summary.json ---------------------------------------------------------------------


def load_summary(run_dir: str | Path) -> Summary:
    """Read and check ``summary.json`` in a run directory (or the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / SUMMARY_NAME
    if not path.is_file():
        raise ConfigError(f"no {SUMMARY_NAME} at {path}: give the directory `apportion bench` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return _summary(data, path)


def _summary(data: Mapping[str, Any], path: Path) -> Summary:
    version = data.get("version", SUPPORTED_VERSION)
    if version != SUPPORTED_VERSION:
        raise ConfigError(f"{path} has summary version {version!r}; this apportion reads version {SUPPORTED_VERSION}")
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"{path} has no rows: the benchmark measured nothing to report")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: 'config' must be an object")
    return Summary(
        version=version,
        run=_text(data.get("run"), default=path.parent.name),
        dataset=_text(data.get("dataset")),
        model=_text(data.get("model")),
        backend=_text(data.get("backend")),
        created=_text(data.get("created")),
        questions=_int_or_none(data.get("questions"), f"{path}: 'questions'"),
        config=config,
        rows=tuple(_row(raw, i, path) for i, raw in enumerate(raw_rows)),
    )


def _row(raw: Any, index: int, path: Path) -> Row:
    where = f"{path} row {index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    for key in ("system", "algorithm", "budget", "accuracy"):
        if raw.get(key) is None:
            raise ConfigError(f"{where} lacks {key!r}")

    def num(key: str) -> float | None:
        return _float_or_none(raw.get(key), f"{where}: {key!r}")

    budget = _int_or_none(raw["budget"], f"{where}: 'budget'")
    if budget is None or budget < 1:
        raise ConfigError(f"{where}: 'budget' must be a positive integer, not {raw['budget']!r}")
    accuracy = num("accuracy")
    if accuracy is None:
        raise ConfigError(f"{where}: 'accuracy' must be a number, not {raw['accuracy']!r}")
    tokens = num("tokens")
    if tokens is None and raw.get("input_tokens") is not None and raw.get("output_tokens") is not None:
        tokens = (num("input_tokens") or 0.0) + (num("output_tokens") or 0.0)
    scorer = raw.get("scorer")
    return Row(
        system=_text(raw["system"]),
        algorithm=_text(raw["algorithm"]),
        scorer=None if scorer in (None, "") else _text(scorer),
        budget=budget,
        mode=_text(raw.get("mode"), default=""),
        questions=_int_or_none(raw.get("questions"), f"{where}: 'questions'"),
        accuracy=accuracy,
        ci_low=num("ci_low"),
        ci_high=num("ci_high"),
        accuracy_std=num("accuracy_std"),
        orders=_int_or_none(raw.get("orders"), f"{where}: 'orders'"),
        input_tokens=num("input_tokens"),
        output_tokens=num("output_tokens"),
        tokens=tokens,
        usd=num("usd"),
        wall_seconds=num("wall_seconds"),
        wall_estimated=bool(raw.get("wall_estimated", False)),
        errors=_int_or_none(raw.get("errors"), f"{where}: 'errors'") or 0,
        by_level=_levels(raw.get("by_level"), where),
    )


def _levels(raw: Any, where: str) -> dict[str, LevelFigure]:
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'by_level' must be an object")
    levels = {}
    for level, figure in raw.items():
        if not isinstance(figure, dict) or figure.get("accuracy") is None:
            raise ConfigError(f"{where}: by_level[{level!r}] needs an 'accuracy'")
        accuracy = _float_or_none(figure["accuracy"], f"{where}: by_level[{level!r}]")
        if accuracy is None:
            continue
        levels[str(level)] = LevelFigure(accuracy, _int_or_none(figure.get("questions"), f"{where}: by_level"))
    return levels


def _text(value: Any, default: str = "?") -> str:
    return default if value is None else str(value)


def _float_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    # bool is an int to Python, but true as an accuracy is a writer's bug worth reporting
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, not {value!r}")
    return float(value) if math.isfinite(value) else None


def _int_or_none(value: Any, what: str) -> int | None:
    number = _float_or_none(value, what)
    if number is None:
        return None
    if not number.is_integer():
        raise ConfigError(f"{what} must be a whole number, not {value!r}")
    return int(number)


# --- curves and labels ------------------------------------------------------------------------


def build_curves(rows: Iterable[Row]) -> list[Curve]:
    """Group rows into curves, in order of first appearance, each with a fixed colour and marker.

    A group holding the same budget twice (a live and a replay run of one algorithm) would zigzag
    as one line, so it is split by mode.
    """
    groups: dict[tuple[str, str, str | None], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.system, row.algorithm, row.scorer), []).append(row)
    keyed: list[tuple[str, list[Row]]] = []
    for (system, algorithm, scorer), members in groups.items():
        base = _curve_label(system, algorithm, scorer)
        budgets = [r.budget for r in members]
        if len(set(budgets)) == len(budgets):
            keyed.append((base, members))
            continue
        by_mode: dict[str, list[Row]] = {}
        for r in members:
            by_mode.setdefault(r.mode, []).append(r)
        keyed.extend((f"{base} ({mode or 'no mode'})", rs) for mode, rs in by_mode.items())
    palette = [to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    return [
        Curve(label=label, rows=tuple(sorted(members, key=lambda r: r.budget)),
              color=palette[i % len(palette)], marker=MARKERS[i % len(MARKERS)],
              peer=members[0].system != HOME_SYSTEM)
        for i, (label, members) in enumerate(keyed)
    ]


def _curve_label(system: str, algorithm: str, scorer: str | None) -> str:
    return f"{system}: {algorithm}" + (f" ({scorer})" if scorer else "")


def point_label(row: Row) -> str:
    """A short name for one point, e.g. ``SC@8``, ``BoN(judge)@4``, ``its_hub SC@16`` for a peer."""
    name = ABBREVIATIONS.get(row.algorithm, row.algorithm)
    if row.scorer:
        name += f"({row.scorer})"
    prefix = "" if row.system == HOME_SYSTEM else f"{row.system} "
    return f"{prefix}{name}@{row.budget}"


def _plottable_tokens(row: Row) -> bool:
    # a log axis cannot show zero, and a row without tokens has no place on a tokens axis
    return row.tokens is not None and row.tokens > 0


# --- plots ------------------------------------------------------------------------------------


def _figure(width: float = 10.0, height: float = 5.6) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    # %g: 35% rather than 35.0%, yet 22.5% where the ticks are that fine
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(100 * v, 6):g}%"))
    return fig, ax


def _subtitle(summary: Summary) -> str:
    count = f"{summary.questions} questions" if summary.questions is not None else "questions: ?"
    return f"{summary.dataset} · {summary.model} · {count}"


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
        labels = [str(h.get_label()) for h in handles]
        fig.legend(handles=handles, loc="outside lower center", ncols=_legend_columns(labels), frameon=False)
    _clamp_percent_axis(ax)


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
        rows = [r for r in curve.rows if x_of(r) is not None]
        if not rows:
            continue
        xs = [x_of(r) for r in rows]
        ax.plot(xs, [r.accuracy for r in rows], linestyle=_line_style(curve), marker=curve.marker,
                color=curve.color, label=curve.label, linewidth=1.8, markersize=6, zorder=3)
        banded = [r for r in rows if r.ci_low is not None and r.ci_high is not None]
        bx = [x_of(r) for r in banded]
        lows, highs = [r.ci_low for r in banded], [r.ci_high for r in banded]
        if len(banded) >= 2:
            ax.fill_between(bx, lows, highs, color=curve.color, alpha=band_alpha, linewidth=0)
            for edge in (lows, highs):
                ax.plot(bx, edge, color=curve.color, alpha=0.45, linewidth=0.6, linestyle=_line_style(curve))
        elif banded:
            ax.vlines(bx, lows, highs, color=curve.color, alpha=0.5)


def plot_accuracy_vs_budget(summary: Summary, curves: Sequence[Curve], path: Path) -> Path:
    fig, ax = _figure()
    _plot_curves(ax, curves, lambda r: r.budget)
    budgets = sorted({r.budget for c in curves for r in c.rows})
    ax.set_xscale("log", base=2)
    # every budget gets a tick when they are few (the usual powers of two); many would overprint
    ax.set_xticks(budgets if len(budgets) <= 12 else [2**k for k in range(int(math.log2(budgets[-1])) + 1)])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("budget (generations per question, log scale)")
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


def plot_pareto(summary: Summary, curves: Sequence[Curve], frontier: Sequence[Row], path: Path) -> Path:
    fig, ax = _figure()
    handles = _scatter_points(ax, curves, frontier)
    if frontier:
        xs = [r.tokens for r in frontier]
        ys = [r.accuracy for r in frontier]
        right = max(r.tokens for c in curves for r in c.rows if _plottable_tokens(r))
        handles.extend(ax.step([*xs, right], [*ys, ys[-1]], where="post", color="black", linewidth=1.4, zorder=2,
                               label="Pareto frontier"))
    _log_tokens_axis(ax)
    _pad_log_x(ax, left=0.35)
    ax.margins(y=0.1)  # headroom for the labels of the top frontier points
    ax.set_ylabel("accuracy")
    _decorate(fig, ax, summary, "Accuracy for tokens: Pareto frontier", handles)
    points = [(r.tokens, r.accuracy) for c in curves for r in c.rows if _plottable_tokens(r)]
    _label_frontier(fig, ax, frontier, points)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def _scatter_points(ax: Axes, curves: Sequence[Curve], frontier: Sequence[Row]) -> list[Artist]:
    on_frontier = {id(r) for r in frontier}
    handles: list[Artist] = []
    for curve in curves:
        rows = [r for r in curve.rows if _plottable_tokens(r)]
        if not rows:
            continue
        # dominated points faded and underneath, so the eye goes to the frontier, also where points tie
        for top, alpha, zorder in ((False, 0.35, 3), (True, 1.0, 4)):
            chosen = [r for r in rows if (id(r) in on_frontier) == top]
            ax.scatter([r.tokens for r in chosen], [r.accuracy for r in chosen], marker=curve.marker,
                       color=curve.color, alpha=alpha, s=42, zorder=zorder, edgecolors="none")
        # the scatter's own legend entry would take the alpha of its first point, often a faded one
        handles.append(Line2D([], [], linestyle="none", marker=curve.marker, color=curve.color, label=curve.label))
    return handles


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


def _label_frontier(fig: Figure, ax: Axes, frontier: Sequence[Row], points: Sequence[tuple[float, float]]) -> None:
    """Label each frontier point at the first spot that covers no point, no other label and stays in the axes.

    Where every spot collides, the one covering least wins: a label overlapping a little beats a missing one,
    and the HTML page lists the frontier in full anyway.
    """
    fig.draw_without_rendering()
    # freeze the layout, so that the pixel positions measured here are those saved
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = [Bbox.from_extents(x - 5, y - 5, x + 5, y + 5) for x, y in ax.transData.transform(points)]
    taken += _step_boxes(ax, frontier)
    # from the top down: a crowded lower neighbour then takes a spot below its upper one, which reads right
    for row in reversed(frontier):
        best: tuple[float, Annotation, Bbox] | None = None
        for spot in (*NEAR_SPOTS, *FAR_SPOTS):
            label = _frontier_label(ax, row, spot, leader=spot in FAR_SPOTS)
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


def _frontier_label(ax: Axes, row: Row, spot: tuple[tuple[int, int], str, str], leader: bool) -> Annotation:
    offset, ha, va = spot
    arrow = {"arrowstyle": "-", "color": "#777777", "linewidth": 0.7, "shrinkA": 0, "shrinkB": 4} if leader else None
    return ax.annotate(point_label(row), (row.tokens, row.accuracy), xytext=offset, textcoords="offset points",
                       ha=ha, va=va, fontsize=9, arrowprops=arrow, zorder=5,
                       bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})


def _step_boxes(ax: Axes, frontier: Sequence[Row]) -> list[Bbox]:
    """Thin boxes around the segments of the frontier's step line, which labels should not hide either."""
    if len(frontier) < 2:
        return []
    corners = ax.transData.transform([(r.tokens, r.accuracy) for r in frontier])
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


def plot_by_level(summary: Summary, curves: Sequence[Curve], path: Path) -> Path | None:
    picks = [(c, max((r for r in c.rows if r.by_level), key=lambda r: r.budget, default=None)) for c in curves]
    picks = [(c, r) for c, r in picks if r is not None]
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


# --- HTML -------------------------------------------------------------------------------------

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.frontier td { font-weight: 600; } .swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em;
       border-radius: 2px; vertical-align: baseline; }
table.meta th { width: 9rem; } table.config td { font-family: ui-monospace, Menlo, monospace; font-size: .85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #666; font-size: .85rem; } .scroll { overflow-x: auto; }
"""


def render_html(summary: Summary, curves: Sequence[Curve], frontier: Sequence[Row], plots: Sequence[Path]) -> str:
    e = html.escape
    title = f"apportion report: {summary.run}"
    sections = [
        f"<h1>{e(title)}</h1>",
        f'<p class="note">{e(_subtitle(summary))}</p>',
        _meta_table(summary),
        _config_table(summary.config),
        "<h2>Plots</h2>",
        *(_embedded_png(p) for p in plots),
        "<h2>All rows</h2>",
        _rows_table(curves, frontier),
        "<h2>Pareto frontier</h2>",
        _frontier_table(frontier, curves),
    ]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _meta_table(summary: Summary) -> str:
    fields = [("run", summary.run), ("dataset", summary.dataset), ("model", summary.model),
              ("backend", summary.backend), ("questions", _opt(summary.questions)), ("created", summary.created)]
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields)
    return f'<table class="meta">{cells}</table>'


def _config_table(config: Mapping[str, Any]) -> str:
    if not config:
        return ""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _flatten(config))
    return f'<h2>Config</h2>\n<table class="config">{cells}</table>'


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    # the config is free-form; dotted keys keep nested options readable in a two-column table
    out: list[tuple[str, str]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, f"{name}."))
        else:
            out.append((name, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)))
    return out


def _embedded_png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem.replace("_", " "))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"></figure>'


ROW_HEADERS = ("system", "algorithm", "scorer", "budget", "mode", "accuracy [95% CI]", "± std (orders)",
               "in tokens", "out tokens", "$ / question", "wall s", "errors")
FRONTIER_HEADERS = ("point", "curve", "budget", "mean tokens", "accuracy [95% CI]")
NUMERIC = {"budget", "mean tokens", "accuracy [95% CI]", "± std (orders)", "in tokens", "out tokens", "$ / question",
           "wall s", "errors"}


def _rows_table(curves: Sequence[Curve], frontier: Sequence[Row]) -> str:
    on_frontier = {id(r) for r in frontier}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ROW_HEADERS)
    lines = []
    for curve in curves:
        for row in curve.rows:
            cells = _row_cells(row)
            rendered = [_td(h, v) for h, v in zip(ROW_HEADERS, cells)]
            rendered[0] = f"<td>{_swatch(curve.color)}{html.escape(cells[0])}</td>"
            cls = ' class="frontier"' if id(row) in on_frontier else ""
            lines.append(f"<tr{cls}>{''.join(rendered)}</tr>")
    note = ('<p class="note">Tokens and dollars are means per question; bold rows lie on the Pareto frontier; '
            "“~” marks an estimated wall time; ± is the spread of accuracy over replay orders.</p>")
    table = f'<table id="rows"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'
    return f'<div class="scroll">{table}</div>\n{note}'


def _swatch(color: str) -> str:
    # the colour comes from our palette, never from the summary, so it needs no escaping
    return f'<span class="swatch" style="background:{color}"></span>'


def _td(header: str, value: str) -> str:
    cls = ' class="num"' if header in NUMERIC else ""
    return f"<td{cls}>{html.escape(value)}</td>"


def _row_cells(row: Row) -> list[str]:
    return [row.system, row.algorithm, row.scorer or "—", str(row.budget), row.mode or "—", _accuracy_ci(row),
            _spread(row), _tokens(row.input_tokens), _tokens(row.output_tokens), _usd(row.usd), _wall(row),
            str(row.errors)]


def _frontier_table(frontier: Sequence[Row], curves: Sequence[Curve]) -> str:
    if not frontier:
        return '<p class="note">No row reports tokens, so there is no frontier and no plot against tokens.</p>'
    colors = {id(r): c.color for c in curves for r in c.rows}
    lines = []
    for r in frontier:
        cells = [_curve_label(r.system, r.algorithm, r.scorer), str(r.budget), _tokens(r.tokens), _accuracy_ci(r)]
        rendered = "".join(_td(h, v) for h, v in zip(FRONTIER_HEADERS[1:], cells))
        lines.append(f"<tr><td>{_swatch(colors[id(r)])}{html.escape(point_label(r))}</td>{rendered}</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in FRONTIER_HEADERS)
    note = ('<p class="note">Each row is the most accurate configuration for at most its mean tokens per question; '
            "every other row is matched or beaten by one of these at no more tokens.</p>")
    return f'<table id="frontier"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>\n{note}'


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _accuracy_ci(row: Row) -> str:
    if row.ci_low is None or row.ci_high is None:
        return _pct(row.accuracy)
    return f"{_pct(row.accuracy)} [{100 * row.ci_low:.1f}, {100 * row.ci_high:.1f}]"


def _spread(row: Row) -> str:
    if row.accuracy_std is None:
        return "—"
    orders = f" ({row.orders})" if row.orders is not None else ""
    return f"±{100 * row.accuracy_std:.1f} pp{orders}"


def _tokens(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _usd(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "$0"
    return f"${value:.4f}" if value >= 0.001 else f"${value:.2e}"


def _wall(row: Row) -> str:
    if row.wall_seconds is None:
        return "—"
    return f"{'~' if row.wall_estimated else ''}{row.wall_seconds:,.1f}"


def _opt(value: Any) -> str:
    return "?" if value is None else str(value)


# --- entry point ------------------------------------------------------------------------------


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Write the plots and ``report.html`` for a run directory; ``out_dir`` defaults to ``run_dir/report``."""
    summary = load_summary(run_dir)
    base = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    out = Path(out_dir) if out_dir is not None else base / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = build_curves(summary.rows)
    frontier = frontier_rows([r for c in curves for r in c.rows])
    with matplotlib.rc_context(STYLE):
        plots = [plot_accuracy_vs_budget(summary, curves, out / "accuracy_vs_budget.png")]
        # without token counts the tokens axes would be empty frames; the page says why they are missing
        if frontier:
            plots.append(plot_accuracy_vs_tokens(summary, curves, out / "accuracy_vs_tokens.png"))
            plots.append(plot_pareto(summary, curves, frontier, out / "pareto.png"))
        by_level = plot_by_level(summary, curves, out / "by_level.png")
    if by_level is not None:
        plots.append(by_level)
    page = out / "report.html"
    page.write_text(render_html(summary, curves, frontier, plots), encoding="utf-8")
    return ReportFiles(out_dir=out, html=page, plots=tuple(plots))
