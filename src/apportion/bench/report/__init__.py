"""Turn a benchmark run directory into PNG plots and one self-contained HTML page.

The input is the ``summary.json`` that ``apportion bench`` writes (or several, over the same
questions, side by side). Rows sharing
(system, algorithm, scorer) form one curve over budgets. The plots:

- ``accuracy_vs_budget.png``: accuracy against generations per question, 95% CI bands;
- ``accuracy_vs_tokens.png``: the same curves against mean tokens per question, the honest
  x-axis, since algorithms and peers spend very different tokens per generation;
- ``pareto.png``: every point by cost (mean tokens, else generations; or what ``apportion bench pareto``
  last chose, from ``pareto.json``) and accuracy, and by wall seconds per question in a second panel
  where the rows have wall times, with the frontier over those axes and the utility winner
  (``bench.pareto``);
- ``stopping.png``: the stopping rules' rows (``apportion bench --stop``) as points beside the uniform
  curve they stop early and under the oracle ceiling (pass@k), against mean generations and mean
  tokens, written only when the run has such rows;
- ``by_level.png``: accuracy per difficulty level at each curve's largest budget, written only
  when the dataset has levels.

The page also gives each curve's Anytime Index (``bench.stats.anytime_index``), per generation and
per token.

``report.html`` embeds them as data URIs next to tables of the run, so the one file can be mailed
or attached to an issue. Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas,
never through pyplot, so building a report leaves no global figure state behind.

The package: ``summary`` reads and checks ``summary.json`` into dataclasses, ``curves`` groups its rows
into curves and names their points, ``frontier`` finds the two-axis Pareto frontier (``bench.pareto`` the
frontier and utility over cost, latency and accuracy), ``stopping`` sets each stopping rule's row beside its
uniform curve, ``plots`` and ``pareto_plot`` (with ``labels``, which places the frontier's labels) draw the
PNGs, and ``page`` writes the HTML. This module holds
``write_report``, which ties them together, and re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

from apportion.bench.pareto import analyse, load_choice
from apportion.bench.report.curves import Curve, build_curves, curve_anytime, point_label
from apportion.bench.report.frontier import _plottable_tokens, frontier_rows, pareto_frontier
from apportion.bench.report.page import render_html
from apportion.bench.report.pareto_plot import plot_pareto
from apportion.bench.report.plots import (
    plot_accuracy_vs_budget,
    plot_accuracy_vs_tokens,
    plot_by_level,
    plot_stopping,
)
from apportion.bench.report.stopping import StopFigure, stop_figures
from apportion.bench.report.summary import LevelFigure, Row, Summary, load_summary, merge_summaries
from apportion.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

__all__ = [
    "Curve", "LevelFigure", "ReportFiles", "Row", "StopFigure", "Summary",
    "build_curves", "curve_anytime", "frontier_rows", "load_summary", "merge_summaries",
    "pareto_frontier", "point_label", "render_html", "stop_figures", "write_report",
    "plot_accuracy_vs_budget", "plot_accuracy_vs_tokens", "plot_by_level", "plot_pareto", "plot_stopping",
]

STYLE: dict[RcKeyType, Any] = {
    "font.size": 11,
    "axes.titlesize": 10,
    "axes.labelsize": 11,
    "figure.titlesize": 13,
    "legend.fontsize": 9,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
}


@dataclass(frozen=True, slots=True)
class ReportFiles:
    """What ``write_report`` wrote: the page and the plots it embeds, in the page's order."""

    out_dir: Path
    html: Path
    plots: tuple[Path, ...] = field(default_factory=tuple)

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.html, *self.plots)


def write_report(run_dir: str | Path | Sequence[str | Path], out_dir: str | Path | None = None) -> ReportFiles:
    """Write the plots and ``report.html`` for a run directory, or for several over the same
    questions side by side (``merge_summaries``; then ``out_dir`` is required); ``out_dir``
    defaults to ``run_dir/report``."""
    runs = [run_dir] if isinstance(run_dir, str | Path) else list(run_dir)
    if len(runs) > 1 and out_dir is None:
        raise ConfigError("several runs are reported together into a directory of their own: give --out")
    summary = merge_summaries([load_summary(r) for r in runs])
    base = Path(runs[0]) if Path(runs[0]).is_dir() else Path(runs[0]).parent
    out = Path(out_dir) if out_dir is not None else base / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = build_curves(summary.rows)
    pareto = analyse(summary.rows, *load_choice(base))
    with matplotlib.rc_context(STYLE):
        plots = [plot_accuracy_vs_budget(summary, curves, out / "accuracy_vs_budget.png")]
        # without token counts the tokens axes would be empty frames; the page says why they are missing
        if any(_plottable_tokens(r) for r in summary.rows):
            plots.append(plot_accuracy_vs_tokens(summary, curves, out / "accuracy_vs_tokens.png"))
        plots.append(plot_pareto(summary, curves, pareto, out / "pareto.png"))
        stops = stop_figures(summary, curves)
        stopping = plot_stopping(summary, stops, out / "stopping.png")
        by_level = plot_by_level(summary, curves, out / "by_level.png")
    plots += [p for p in (stopping, by_level) if p is not None]
    page = out / "report.html"
    page.write_text(render_html(summary, curves, pareto, plots, stops), encoding="utf-8")
    return ReportFiles(out_dir=out, html=page, plots=tuple(plots))
