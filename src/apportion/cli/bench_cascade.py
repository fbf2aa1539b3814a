"""``apportion bench cascade``: a cascade against each of its models alone at equal dollars, over
banks of the same questions."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apportion.allocate.cascade import CONFIDENCES
from apportion.allocate.cascade_choice import StageBank
from apportion.banks import missing_token_counts, open_bank
from apportion.bench.cascade import DEFAULT_KS, CascadeBench, run_cascade_bench
from apportion.budget.prices import PriceTable
from apportion.budget.units import Price
from apportion.cli._app import EXIT_USAGE, fail
from apportion.cli.bench import bench_app
from apportion.errors import ApportionError, ConfigError


@bench_app.command("cascade")
def bench_cascade(
    bank: Annotated[list[Path], typer.Option(
        "--bank", help="A sample bank per model, cheapest first (repeat); all on the same questions.")],
    budgets: Annotated[str, typer.Option(
        help="Mean dollars per question, comma-separated ('usd=' optional): e.g. usd=0.00001,0.00002.")],
    name: Annotated[list[str] | None, typer.Option(
        "--name", help="A name per bank, in order (default: the model its header names).")] = None,
    price_file: Annotated[Path | None, typer.Option(
        "--price-file", help="JSON of model name -> a pair: input, output USD per million tokens.")] = None,
    price: Annotated[list[str] | None, typer.Option(
        "--price", help="IN,OUT USD per million tokens per bank, in order (repeat; instead of --price-file).")]
    = None,
    orders: Annotated[int, typer.Option(help="Replay orders of each held-out run.")] = 10,
    choice_orders: Annotated[int, typer.Option(help="Simulated orders the choices are made on.")] = 20,
    ks: Annotated[str, typer.Option(help="Sample counts a model may be given.")] = ",".join(map(str, DEFAULT_KS)),
    confidence: Annotated[str, typer.Option(help=f"Confidence kinds to choose from: {', '.join(CONFIDENCES)}.")]
    = ",".join(CONFIDENCES),
    seed: Annotated[int, typer.Option(help="Seed of the replay and simulated orders.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/cascade-<time>).")] = None,
) -> None:
    """Cascade versus each model alone at equal dollars: choices made on one fold of questions,
    run with the engine on the other, both ways; writes cascade.json."""
    console = Console(stderr=True, soft_wrap=True)
    try:
        stages = _stages(bank, name, price_file, price)
        bench = CascadeBench(stages, tuple(_budgets(budgets)), orders=orders, choice_orders=choice_orders, seed=seed,
                             ks=tuple(_ints(ks, "--ks")), confidences=tuple(_kinds(confidence)))
        run_dir = out or Path("runs") / f"cascade-{datetime.now():%Y%m%d-%H%M%S}"
        if (run_dir / "cascade.json").exists():
            raise ConfigError(f"{run_dir} already holds a cascade run; choose another --out (never overwritten)")
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    report = asyncio.run(run_cascade_bench(bench))
    report["banks"] = [str(p) for p in bank]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cascade.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    screen = Console()
    _print(report, screen if screen.is_terminal else Console(width=170))
    console.print(f"wrote {run_dir / 'cascade.json'}")


def _stages(banks: list[Path], names: list[str] | None, price_file: Path | None,
            prices: list[str] | None) -> tuple[StageBank, ...]:
    if len(banks) < 2:
        raise ConfigError("give two or more --bank, cheapest model first")
    if names is not None and len(names) != len(banks):
        raise ConfigError(f"{len(names)} --name for {len(banks)} --bank")
    if (price_file is None) == (prices is None):
        raise ConfigError("give --price-file or one --price per bank (a dollar comparison needs every price)")
    if prices is not None and len(prices) != len(banks):
        raise ConfigError(f"{len(prices)} --price for {len(banks)} --bank")
    table = PriceTable.from_json(price_file, base=PriceTable({})) if price_file is not None else None
    out = []
    for i, path in enumerate(banks):
        loaded = open_bank(path)
        if missing_token_counts(loaded) or any(e.prompt_tokens <= 0 for e in loaded.entries):
            raise ConfigError(f"{path}: the bank did not record its token counts, so its dollars cannot be priced")
        model = names[i] if names is not None else str(loaded.meta.get("model") or path.parent.name)
        found = Price.parse(prices[i]) if prices is not None else table.lookup(model) if table is not None else None
        if found is None:
            raise ConfigError(f"{price_file} has no price for {model!r} (bank {path}); add it, or pass --name")
        out.append(StageBank(model, loaded, found))
    return tuple(out)


def _budgets(text: str) -> list[float]:
    raw = text.strip()
    if raw.lower().startswith("usd="):
        raw = raw[4:]
    try:
        values = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--budgets must be dollars per question, e.g. usd=0.00001,0.00002; got {text!r}") from None
    if not values:
        raise ConfigError("--budgets is empty")
    return values


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{option} must list whole numbers >= 1, got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [k for k in kinds if k not in CONFIDENCES]
    if not kinds or unknown:
        raise ConfigError(f"--confidence takes {', '.join(CONFIDENCES)}; got {text!r}")
    return kinds


def _print(report: dict[str, Any], console: Console) -> None:
    costs = Table(title="Cost per question by model and samples (one batched call; mean recorded tokens)")
    for column in ("model", "k", "$ / question", "reserved $ (worst case)", "accuracy (all questions, in-sample)"):
        costs.add_column(column, justify="left" if column == "model" else "right")
    accuracy = {(r["model"], r["k"]): r["accuracy"] for r in report["in_sample"]}
    for r in report["cost_table"]:
        costs.add_row(r["model"], str(r["k"]), f"{r['usd']:.2e}", f"{r['worst_usd']:.2e}",
                      f"{100 * accuracy.get((r['model'], r['k']), float('nan')):.1f}%")
    console.print(costs)
    for row in report["rows"]:
        table = Table(title=f"${row['usd_per_question']:.2e} per question: chosen on one fold, run on the other "
                            f"({report['orders']} replay orders)")
        for column in ("arm", "chosen (fold 1 | fold 2)", "accuracy [95% CI]", "$ / question", "samples / question",
                       "escalated", "cascade minus this [95% CI]"):
            table.add_column(column, justify="left" if column in ("arm", "chosen (fold 1 | fold 2)") else "right")
        for arm, a in row["arms"].items():
            low, high = a["interval"]
            diff = row.get("cascade_minus", {}).get(arm)
            table.add_row(arm, " | ".join(_chosen(f["chosen"]) for f in a["folds"]),
                          f"{100 * a['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]",
                          f"{a['usd_per_question']:.2e}",
                          ", ".join(f"{m} {n:.2f}" for m, n in a["samples_per_question"].items()),
                          f"{100 * a['escalated']:.0f}%",
                          "-" if diff is None else f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]")
        console.print(table)
        if row.get("unaffordable"):
            console.print(f"no configuration fits this budget for: {', '.join(row['unaffordable'])}")
        picks = [f"fold {i + 1}: {b['models'][0]} k={b['samples'][0]} ({100 * b['held_out_accuracy']:.1f}% held out)"
                 for i, b in enumerate(row.get("best_single") or []) if b is not None]
        if picks:
            console.print("best model and sample count under this budget, chosen on the other fold: "
                          + "; ".join(picks))


def _chosen(c: dict[str, Any]) -> str:
    samples = "+".join(str(k) for k in c["samples"])
    if len(c["models"]) == 1:
        return f"k={samples}"
    return f"k={samples}, {c['confidence']} < {', '.join(f'{t:.3f}' for t in c['thresholds'])}"
