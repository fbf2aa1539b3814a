"""``apportion bench pareto``: a run's non-dominated configurations over cost, latency and accuracy, and
the one a user-weighted utility picks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from apportion.cli._app import EXIT_USAGE, fail
from apportion.cli.bench import bench_app
from apportion.errors import ApportionError

if TYPE_CHECKING:
    from apportion.bench.pareto import Pareto, Point


@bench_app.command("pareto")
def bench_pareto(
    run: Annotated[Path, typer.Argument(metavar="RUN_DIR",
                                        help="A run directory of `apportion bench` (its summary.json).")],
    cost: Annotated[str, typer.Option(
        help="Cost axis: tokens, usd or generations (auto: tokens where the rows counted them, else generations).")]
    = "auto",
    weights: Annotated[str | None, typer.Option(
        help="Utility weights cost=W,latency=W: accuracy points per 1,000 tokens (per dollar, per generation) "
             "and per second of wall time per question.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print pareto.json instead of the table.")] = False,
) -> None:
    """The Pareto frontier of a run over (cost, latency, accuracy) and the utility winner; writes pareto.json."""
    # the summary reader lives in the report package, which imports matplotlib: only here
    from apportion.bench.pareto import Weights, analyse, parse_weights, save
    from apportion.bench.report.summary import load_summary

    try:
        summary = load_summary(run)
        result = analyse(summary.rows, cost, parse_weights(weights) if weights is not None else Weights())
        base = run if run.is_dir() else run.parent
        out = save(base, result)
    except ApportionError as exc:
        fail(Console(stderr=True, soft_wrap=True), exc, EXIT_USAGE)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        console = Console()
        # off a terminal rich assumes 80 columns and would fold every cell
        _print(result, summary.run, console if console.is_terminal else Console(width=170))
    Console(stderr=True, soft_wrap=True).print(f"wrote {out}")


def _print(result: Pareto, run: str, console: Console) -> None:
    from apportion.bench.pareto import describe, format_cost

    axes = f"{result.cost.column}, " + ("seconds per question, " if result.latency else "") + "accuracy"
    table = Table(title=f"Pareto frontier over {axes}: {run}")
    for column in ("", "configuration", result.cost.column, "s / question", "accuracy [95% CI]", "utility [95%]"):
        table.add_column(column, justify="left" if column in ("", "configuration") else "right")
    by_index = {p.index: p.row for p in result.points}
    for p in result.frontier:
        ties = f" (tied: {', '.join(describe(by_index[t]) for t in p.ties)})" if p.ties else ""
        table.add_row("*" if p is result.winner else "", describe(p.row) + ties, format_cost(result.cost, p.cost),
                      "-" if p.latency is None else f"{p.latency:,.2f}", _accuracy(p), _utility(p))
    console.print(table)
    w = result.weights
    console.print(f"utility U = 100 x accuracy - {w.cost:g} x {result.cost.name}"
                  + (f" / {result.cost.per:,.0f}" if result.cost.per != 1 else "")
                  + (f" - {w.latency:g} x seconds" if result.latency else "")
                  + f" (accuracy points; cost weight in {result.cost.weight_unit}"
                  + (", latency weight in accuracy points per second)" if result.latency else ")"))
    console.print(f"* winner: {describe(result.winner.row)}: U = {_utility(result.winner)}, "
                  f"accuracy {_accuracy(result.winner)}")
    if result.runner_up is not None:
        console.print(f"  runner-up: {describe(result.runner_up.row)}: U = {_utility(result.runner_up)}")
    if result.separated is False:
        console.print(f"  not separated: their 95% intervals overlap; {len(result.close)} other configuration(s) "
                      "reach the winner's interval")
    elif result.separated:
        console.print("  separated: the winner's 95% interval lies above the runner-up's")
    for note in result.notes:
        console.print(f"note: {note}")


def _accuracy(p: Point) -> str:
    r = p.row
    if r.ci_low is None or r.ci_high is None:
        return f"{100 * r.accuracy:.1f}%"
    return f"{100 * r.accuracy:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"


def _utility(p: Point) -> str:
    if p.utility_interval is None:
        return f"{p.utility:.1f}"
    low, high = p.utility_interval
    return f"{p.utility:.1f} [{low:.1f}, {high:.1f}]"
