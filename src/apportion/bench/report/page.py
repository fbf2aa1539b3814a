"""The HTML page: the run's metadata and config, the plots embedded as data URIs, and tables of every
row and of the frontier, in one self-contained file."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from apportion.bench.pareto import Pareto, Point, format_cost
from apportion.bench.report.curves import Curve, _curve_label, curve_anytime, point_label
from apportion.bench.report.stopping import StopFigure
from apportion.bench.report.summary import Row, Summary, _subtitle

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { padding: .25rem .6rem; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.frontier td { font-weight: 600; } tr.winner td { background: #fff6cc; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .4em;
       border-radius: 2px; vertical-align: baseline; }
table.meta th { width: 9rem; } table.config td { font-family: ui-monospace, Menlo, monospace; font-size: .85rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.note { color: #666; font-size: .85rem; } .scroll { overflow-x: auto; }
"""


def render_html(summary: Summary, curves: Sequence[Curve], pareto: Pareto, plots: Sequence[Path],
                stops: Sequence[StopFigure] = ()) -> str:
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
        _rows_table(curves, pareto),
        *(["<h2>Stopping rules</h2>", _stopping_table(stops)] if stops else []),
        "<h2>Anytime index</h2>",
        _anytime_table(curves),
        "<h2>Pareto frontier</h2>",
        _frontier_table(pareto, curves),
    ]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _meta_table(summary: Summary) -> str:
    fields = [("run", summary.run), ("dataset", summary.dataset), ("model", summary.model),
              ("backend", summary.backend), ("questions", _opt(summary.questions)), ("created", summary.created),
              ("token counts", f"estimated: {summary.tokens_estimated}" if summary.tokens_estimated
               else "as the backend reported them")]
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
FRONTIER_HEADERS = ("point", "curve", "budget", "cost", "s / question", "accuracy [95% CI]", "utility [95%]")
NUMERIC = {"budget", "cost", "s / question", "utility [95%]", "pp per generation", "pp per 1k tokens",
           "uniform at full budget", "Δ accuracy", "generations used", "share of full-budget tokens", "oracle pass@k",
           "mean tokens", "accuracy [95% CI]", "± std (orders)", "in tokens", "out tokens", "$ / question",
           "wall s", "errors"}


def _rows_table(curves: Sequence[Curve], pareto: Pareto) -> str:
    # rows tied exactly with a frontier point are as much on the frontier as the one standing for them
    indices = {i for p in pareto.frontier for i in (p.index, *p.ties)}
    on_frontier = {id(p.row) for p in pareto.points if p.index in indices}
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


STOP_HEADERS = ("rule", "accuracy [95% CI]", "uniform at full budget", "Δ accuracy", "generations used",
                "out tokens", "share of full-budget tokens", "oracle pass@k")


def _stopping_table(stops: Sequence[StopFigure]) -> str:
    lines = []
    for f in stops:
        uniform = f.uniform_row
        delta = "—" if uniform is None else f"{100 * (f.row.accuracy - uniform.accuracy):+.1f} pp"
        cells = [_accuracy_ci(f.row), "—" if uniform is None else _accuracy_ci(uniform), delta,
                 f"{f.row.mean_generations:.2f} of {f.row.budget} ({_pct(f.generation_share)})",
                 _tokens(f.row.output_tokens), "—" if f.token_share is None else _pct(f.token_share),
                 "—" if f.oracle is None else f"{_pct(f.oracle.accuracy)} @{f.oracle.budget}"]
        rendered = "".join(_td(h, v) for h, v in zip(STOP_HEADERS[1:], cells))
        lines.append(f"<tr><td>{_swatch(f.curve.color)}{html.escape(f.curve.label)}</td>{rendered}</tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in STOP_HEADERS)
    note = ('<p class="note">Each rule ran the algorithm under the full budget (the bank\'s samples per question) '
            "and stopped when it chose; its accuracy is set beside the same algorithm spending that whole budget. "
            "The token share is the rule's mean output tokens over the full budget's (the uniform row's, else "
            "all the bank's samples'); “—” where the rows have no token counts. The oracle counts a question "
            "right when any of its first k samples is right: no selection can beat it with k samples.</p>")
    return f'<table id="stopping"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>\n{note}'


ANYTIME_HEADERS = ("curve", "budgets", "pp per generation", "pp per 1k tokens")


def _anytime_table(curves: Sequence[Curve]) -> str:
    lines = []
    for curve in curves:
        if len(curve.rows) < 2:
            continue
        per_generation, per_token = curve_anytime(curve)
        cells = [", ".join(str(r.budget) for r in curve.rows), _signed(per_generation, 100),
                 _signed(per_token, 100_000)]
        rendered = "".join(_td(h, v) for h, v in zip(ANYTIME_HEADERS[1:], cells))
        lines.append(f"<tr><td>{_swatch(curve.color)}{html.escape(curve.label)}</td>{rendered}</tr>")
    if not lines:
        return '<p class="note">No curve has two budgets, so none has an Anytime Index.</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ANYTIME_HEADERS)
    note = ('<p class="note">Anytime Index (seed 001): AI = (1/|B|) Σ ΔQ(b)/Δb, the accuracy Q gained per unit '
            "of budget b between neighbouring budgets of the curve, averaged over its |B| increments; in "
            "percentage points per generation, and per 1,000 mean tokens per question. Higher: accuracy comes "
            "sooner. It depends on the budget grid, so compare curves measured at the same budgets; “—” where "
            "the rows have no token counts.</p>")
    return f'<table id="anytime"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>\n{note}'


def _signed(value: float | None, scale: float) -> str:
    return "—" if value is None else f"{scale * value:+.3f}"


def _frontier_table(pareto: Pareto, curves: Sequence[Curve]) -> str:
    colors = {id(r): c.color for c in curves for r in c.rows}
    head = "".join(f"<th>{html.escape(pareto.cost.column if h == 'cost' else h)}</th>" for h in FRONTIER_HEADERS)
    lines = []
    for p in pareto.frontier:
        r = p.row
        cells = [_curve_label(r.system, r.algorithm, r.scorer), str(r.budget), format_cost(pareto.cost, p.cost),
                 "—" if p.latency is None else f"{'~' if r.wall_estimated else ''}{p.latency:,.2f}",
                 _accuracy_ci(r), _utility(p)]
        rendered = "".join(_td(h, v) for h, v in zip(FRONTIER_HEADERS[1:], cells))
        cls = ' class="winner"' if p is pareto.winner else ""
        lines.append(f"<tr{cls}><td>{_swatch(colors[id(r)])}{html.escape(point_label(r))}</td>{rendered}</tr>")
    table = f'<table id="frontier"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'
    return f'<div class="scroll">{table}</div>\n{_frontier_note(pareto)}'


def _frontier_note(pareto: Pareto) -> str:
    e = html.escape
    axes = "cost, latency and accuracy" if pareto.latency else "cost and accuracy"
    w = pareto.weights
    weights = (f"w_cost = {w.cost:g} ({pareto.cost.weight_unit})"
               + (f", w_latency = {w.latency:g} (accuracy points per second)" if pareto.latency else ""))
    per = f"{pareto.cost.name} / {pareto.cost.per:,.0f}" if pareto.cost.per != 1 else pareto.cost.name
    latency = " − w_latency × seconds" if pareto.latency else ""
    winner = f"<strong>{e(point_label(pareto.winner.row))}</strong>, U = {e(_utility(pareto.winner))}"
    if pareto.runner_up is not None:
        runner = f"{e(point_label(pareto.runner_up.row))}, U = {e(_utility(pareto.runner_up))}"
        verdict = {True: "its interval lies wholly above the runner-up's",
                   False: f"their intervals overlap, so the data do not tell them apart ({len(pareto.close)} "
                          "other configuration(s) reach the winner's interval)",
                   None: "without accuracy intervals the gap cannot be judged"}[pareto.separated]
        winner += f"; runner-up {runner}: {e(verdict)}"
    notes = "".join(f" {e(n[0].upper() + n[1:])}." for n in pareto.notes)
    return (f'<p class="note">The frontier over {axes}: no other configuration is at least as good on every one '
            f"and better on one. Cost is {e(pareto.cost.meaning)}; latency is the cell's wall seconds "
            "per question (“~”: estimated from the bank's request times). Rows tied exactly are one point; "
            f"the first stands for them.{notes}</p>\n"
            f'<p class="note">Utility U = 100 × accuracy − w_cost × {e(per)}{latency}, in accuracy points, with '
            f"{e(weights)}: <code>apportion bench pareto RUN_DIR --weights cost=W,latency=W</code> sets them "
            f"(in the run's pareto.json, which this page reads). The highlighted row maximises it: {winner}.</p>")


def _utility(p: Point) -> str:
    if p.utility_interval is None:
        return f"{p.utility:.1f}"
    return f"{p.utility:.1f} [{p.utility_interval[0]:.1f}, {p.utility_interval[1]:.1f}]"


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
