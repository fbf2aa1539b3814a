"""``apportion bench --bank B --policy P``: allocation policies compared on identical samples."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from apportion.algorithms.base import SamplingOptions
from apportion.allocate.learned import LearnedEstimator
from apportion.allocate.policies import POLICIES
from apportion.banks import SampleBank, open_bank
from apportion.bench.allocation import ReplaySetup, compare_policies
from apportion.budget.units import Budget
from apportion.errors import ConfigError


def run_policies(bank: SampleBank, policies: list[str], algorithms: list[str], mean_budget: str | None,
                 orders: int, seed: int, scorer: str, sampling: SamplingOptions, probe: int, out: Path,
                 console: Console, estimator: Path | None = None, think_bank: Path | None = None) -> dict[str, Any]:
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    mean = Budget.parse(mean_budget) if mean_budget else Budget(generations=max(1, bank.k // 2))
    if mean.generations is not None and mean.generations * 2 > bank.k:
        console.print(f"[yellow]note:[/yellow] a mean of {mean.generations} samples per question leaves a policy "
                      f"little room: the bank has {bank.k} (compare at no more than half)")
    setup = ReplaySetup(bank, mean, orders=orders, seed=seed, scorer=scorer, sampling=sampling, probe=probe,
                        estimator=LearnedEstimator.load(estimator) if estimator is not None else None,
                        think_bank=open_bank(think_bank) if think_bank is not None else None)
    summary = asyncio.run(compare_policies(setup, policies, algorithms))
    out.mkdir(parents=True, exist_ok=True)
    (out / "policies.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for row in summary["rows"]:
        if row["tables"]:
            (out / "strategies.json").write_text(json.dumps(row["tables"][0], indent=1) + "\n", encoding="utf-8")
    # off a terminal rich assumes 80 columns and would fold every cell; a log file can be wide
    _table(summary, console if console.is_terminal else Console(width=170))
    return summary


def _table(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Policies at {Budget(**summary['budget_per_question'])} per question "
                        f"({summary['questions']} questions, {summary['orders']} orders)")
    for column in ("policy", "algorithm", "accuracy [95% CI]", "tokens/q", "samples/q",
                   "vs uniform (same algorithm)", "vs equal samples (same)", "vs uniform SC", "vs best fixed"):
        table.add_column(column, justify="left" if column in ("policy", "algorithm") else "right")
    for r in summary["rows"]:
        low, high = r["interval"]
        table.add_row(r["policy"], r["algorithm"], f"{100 * r['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
                      f"{r['tokens_per_question']:.0f}", f"{r['generations_per_question']:.2f}",
                      *(_diff(r[k]) for k in ("vs_uniform_same_algorithm", "vs_equal_samples_same_algorithm",
                                              "vs_uniform_self_consistency", "vs_best_fixed")))
    console.print(table)


def _diff(d: list[float]) -> str:
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"


def train_estimator(banks: list[Path], out: Path, orders: int, seed: int) -> LearnedEstimator:
    """Fit the learned estimator on banks with gold answers and save it."""
    from apportion.allocate.learned import train

    if not banks:
        raise ConfigError("give at least one --bank to train on")
    estimator = train([(path.name if path.name != "bank.jsonl" else path.parent.name, open_bank(path))
                       for path in banks], orders=orders, seed=seed)
    estimator.save(out)
    return estimator
