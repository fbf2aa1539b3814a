"""``apportion bench joint``: prompt template and strategy chosen together, on one bank per template."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apportion.banks import SampleBank, open_bank
from apportion.bench.allocation import SELECTORS
from apportion.bench.joint import JointSetup, compare_joint
from apportion.budget.units import Budget
from apportion.cli._app import EXIT_USAGE, fail
from apportion.cli.bench import bench_app
from apportion.errors import ApportionError, ConfigError


@bench_app.command("joint")
def bench_joint(
    bank: Annotated[list[str], typer.Option(
        "--bank", help="TEMPLATE=PATH: a bank drawn with that prompt mode (plain, tale, cod) over the same "
                       "questions as the others (repeatable, two or more).")],
    algorithms: Annotated[str, typer.Option(
        help=f"Comma-separated strategies ({', '.join(SELECTORS)}); self-consistency is always searched.")]
    = ",".join(SELECTORS),
    budget: Annotated[str, typer.Option(
        help="The mean budget per question of every pair: 'gen=4', or 'tokens=450' (the fair unit across "
             "templates: shorter answers fit more samples).")] = "gen=4",
    orders: Annotated[int, typer.Option(help="Random sample orders per pair and fold.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the orders and of the bootstrap.")] = 0,
    probe: Annotated[int, typer.Option(help="Samples per question before the pooled budget is shared out.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Run directory for joint.json (default: runs/joint-<time>).")]
    = None,
) -> None:
    """Every (template, strategy) pair at one mean budget; the pair chosen on one fold of questions,
    reported on the other (both ways), against the template or the strategy chosen alone."""
    console = Console(stderr=True, soft_wrap=True)
    try:
        banks = _banks(bank)
        parts = [a.strip() for a in algorithms.split(",")]
        if not all(parts):
            raise ConfigError(f"--algorithms: empty item in {algorithms!r}")
        setup = JointSetup(banks, tuple(parts), Budget.parse(budget), orders=orders, seed=seed, probe=probe)
        run_dir = out or Path("runs") / f"joint-{datetime.now():%Y%m%d-%H%M%S}"
        if (run_dir / "joint.json").exists():
            raise ConfigError(f"{run_dir} already holds joint.json; choose another --out (it is never overwritten)")
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"--out {run_dir} is a file; it must name a run directory")
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    report = asyncio.run(compare_joint(setup))
    report["bank_files"] = {t: entry.partition("=")[2] for t, entry in zip(banks, bank)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "joint.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    stdout = Console()
    # off a terminal rich assumes 80 columns and would fold every cell; a log file can be wide
    _tables(report, stdout if stdout.is_terminal else Console(width=170))
    console.print(f"wrote {run_dir / 'joint.json'}")


def _banks(entries: list[str]) -> dict[str, SampleBank]:
    banks: dict[str, SampleBank] = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ConfigError(f"--bank takes TEMPLATE=PATH (e.g. cod=runs/qwen-cod100/bank.jsonl), got {entry!r}")
        if name in banks:
            raise ConfigError(f"template {name!r} is given twice")
        banks[name] = open_bank(Path(path.strip()))
    return banks


def _tables(report: dict[str, Any], console: Console) -> None:
    unit = Budget(**report["budget_per_question"])
    pairs = Table(title=f"Every pair at {unit} per question ({report['questions']} questions, "
                        f"{report['orders']} orders; in sample, no choice made)")
    for column in ("template", "strategy", "accuracy [95% CI]", "fold 1", "fold 2", "tokens/q", "samples/q"):
        pairs.add_column(column, justify="left" if column in ("template", "strategy") else "right")
    for r in report["pairs"]:
        pairs.add_row(r["template"], r["strategy"], _accuracy(r), *(f"{100 * a:.1f}%" for a in r["fold_accuracy"]),
                      f"{r['tokens_per_question']:.0f}", f"{r['samples_per_question']:.2f}")
    console.print(pairs)
    capped = [f"{r['template']} + {r['strategy']}" for r in report["pairs"] if r["capped"]]
    if capped:
        console.print(f"drew every sample its bank holds (the bank, not the budget, bound it): {', '.join(capped)}")
    held = Table(title="Chosen on one fold, scored on the other (both ways)")
    for column in ("choice", "fold 1's pair (chosen on 2)", "fold 2's pair (chosen on 1)", "held-out accuracy",
                   "tokens/q", "joint minus this [95% CI]"):
        held.add_column(column, justify="left" if column in ("choice",) or "pair" in column else "right")
    for r in report["choices"]:
        d = r["joint_minus_this"]
        held.add_row(r["label"], *(" + ".join(p) for p in r["pairs"]), _accuracy(r), f"{r['tokens_per_question']:.0f}",
                     "-" if r["choice"] == "joint" else f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]")
    console.print(held)


def _accuracy(row: dict[str, Any]) -> str:
    low, high = row["interval"]
    return f"{100 * row['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
