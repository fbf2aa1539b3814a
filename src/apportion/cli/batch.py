"""``apportion batch``: a file of prompts under one total budget, shared out by a policy.

``apportion run --file F --total-budget B`` is the same command: both read the file, check the
output, and write rows as ``run --file`` does; here every row also says what the allocator did.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apportion.algorithms.base import SamplingOptions, check_budget_can_bind
from apportion.algorithms.registry import ALGORITHMS, make_algorithm, needs_process_scorer
from apportion.allocate.engine import BatchResult, answer_batch
from apportion.allocate.learned import LearnedEstimator
from apportion.allocate.policies import POLICIES, StrategyTable, ThinkRoute, make_policy
from apportion.allocate.ray_executor import RayExecutor, import_ray
from apportion.batch import Item, read_items
from apportion.budget.units import Budget
from apportion.cli._app import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ApiKeyOpt,
    BaseUrlOpt,
    MaxTokensOpt,
    ModelOpt,
    ModelPathOpt,
    PriceFileOpt,
    PriceOpt,
    ScorerOpt,
    SystemPromptOpt,
    TemperatureOpt,
    TimeoutOpt,
    TopPOpt,
    app,
    checked_preflight,
    fail,
    make_backend,
    make_scorer,
    sampling_options,
)
from apportion.cli._cascade import (
    CascadeSamplesOpt,
    ConfidenceOpt,
    ModelsOpt,
    ThresholdOpt,
    cascade_batch_command,
)
from apportion.errors import ApportionError, ConfigError
from apportion.files import ReplacingWriter, check_output
from apportion.lm.base import Backend
from apportion.reward.base import OutcomeScorer

EXECUTORS = ("local", "ray")
PolicyOpt = Annotated[str, typer.Option(
    "--policy", help=f"How the total is shared: {', '.join(POLICIES)}; or cascade, over --models.")]
EstimatorOpt = Annotated[Path | None, typer.Option(
    "--estimator", help="A learned difficulty estimator (`apportion bench train-estimator`); default: agreement.")]
StrategiesOpt = Annotated[Path | None, typer.Option(
    "--strategies", help="A strategy table (JSON: an algorithm and weight per difficulty bin), e.g. the "
                         "strategies.json that `apportion bench --policy compute-optimal` writes.")]


@dataclass(frozen=True, slots=True)
class BatchJob:
    """Everything a batch under a total budget needs, checked."""

    items: list[Item]
    total: Budget
    policy: str
    algorithm: str
    sampling: SamplingOptions
    scorer: OutcomeScorer
    table: StrategyTable | None
    probe: int
    horizon: int
    concurrency: int
    seed: int | None
    estimator: LearnedEstimator | None = None
    executor: str = "local"
    ray_address: str | None = None
    think: bool = False


async def run_job(job: BatchJob, backend: Backend) -> BatchResult:
    policy = make_policy(job.policy, window=job.concurrency, probe=job.probe, horizon=job.horizon, table=job.table,
                         estimator=job.estimator, think=ThinkRoute() if job.think else None)
    remote = RayExecutor(job.ray_address) if job.executor == "ray" else None
    try:
        return await answer_batch(
            job.items, backend, job.total, policy, lambda name: make_algorithm(name, job.sampling, job.scorer),
            algorithm=job.algorithm, max_tokens=job.sampling.max_tokens, system_prompt=job.sampling.system_prompt,
            concurrency=job.concurrency, seed=job.seed, max_samples=job.horizon, executor=remote)
    finally:
        if remote is not None:
            remote.close()
        await backend.aclose()


def write_batch(result: BatchResult, out: Path, report: Path, json_out: bool, trace: bool,
                console: Console) -> int:
    """The rows (file order) and the allocation report; the exit code as ``run --file`` has it."""
    counts: Counter[str] = Counter()
    writer = ReplacingWriter(out)
    with writer:
        for outcome in result.outcomes:
            row = outcome.to_dict(trace=trace)
            writer.write_line(row)
            counts[outcome.status] += 1
            if outcome.error is not None:
                console.print(f"[red]{'warning' if outcome.status == 'answered' else 'error'}:[/red] {outcome.error}")
            if json_out:
                typer.echo(json.dumps(row, ensure_ascii=False))
    summary = result.report()
    report.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _print_bins(summary, console)
    s = result.spent
    console.print(f"{counts['answered']} of {len(result.outcomes)} answered; spent {s.generations} generations, "
                  f"{s.input_tokens + s.output_tokens} tokens, ${float(s.usd):.6f} of {result.budget} "
                  f"in {result.rounds} round(s); wrote {out} and {report}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    return EXIT_FAILURE if counts["failed"] or counts["invalid"] or not counts["answered"] + counts["unanswered"] else 0


def _print_bins(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="Spend per difficulty bin (0 easiest)", show_edge=False)
    for column in ("bin", "prompts", "generations", "tokens", "usd"):
        table.add_column(column, justify="right")
    for key, b in summary["per_bin"].items():
        table.add_row(key, str(b["prompts"]), str(b["generations"]), str(b["tokens"]), f"{b['usd']:.6f}")
    console.print(table)


def checked_job(file: Path, out: Path | None, total_budget: str, policy: str, algorithm: str,
                sampling: SamplingOptions, scorer: str, strategies: Path | None, probe: int, horizon: int,
                concurrency: int, seed: int | None, field: str | None, estimator: Path | None = None,
                executor: str = "local", ray_address: str | None = None, think: bool = False) -> BatchJob:
    if out is None:
        raise ConfigError("a batch needs --out, the JSONL file to write answers to")
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    if concurrency < 1 or probe < 1 or horizon < probe:
        raise ConfigError("--concurrency and --probe must be >= 1, and --horizon >= --probe")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    if executor == "ray":
        import_ray()  # a missing Ray is a usage error, reported before any work
    elif ray_address is not None:
        raise ConfigError("--ray-address goes with --executor ray")
    total = Budget.parse(total_budget)
    if needs_process_scorer(make_algorithm(algorithm, sampling, make_scorer(scorer))):  # validates before any work
        raise ConfigError(f"{algorithm} needs a process scorer, which `apportion batch` does not take yet "
                          "(use `apportion run --file ... --process-scorer ...`)")
    table = StrategyTable.load(strategies) if strategies is not None else None
    check_output(out, inputs=(file,))
    learned = LearnedEstimator.load(estimator) if estimator is not None else None
    if think and policy in ("uniform", "front-load", "back-load"):
        raise ConfigError(f"--think routes after a probe, which the {policy} policy does not draw")
    return BatchJob(read_items(file, field), total, policy, algorithm, sampling, make_scorer(scorer), table,
                    probe, horizon, concurrency, seed, learned, executor, ray_address, think)


def run_batch_command(job: BatchJob, backend: Backend, out: Path, report: Path | None, json_out: bool,
                      trace: bool, console: Console) -> None:
    try:
        check_budget_can_bind(job.total, backend)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    checked_preflight(backend, console)
    try:
        result = asyncio.run(run_job(job, backend))
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
    code = write_batch(result, out, report or out.with_name(out.name + ".allocation.json"), json_out, trace, console)
    if code:
        raise typer.Exit(code)


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="JSONL file of prompts.")],
    total_budget: Annotated[str, typer.Option(
        "--total-budget", help="What the whole file may spend: 'tokens=200000', 'gen=400,usd=0.5', ...")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where the JSONL answers go.")] = None,
    policy: PolicyOpt = "compute-optimal",
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help=f"One of: {', '.join(ALGORITHMS)}.")] =
        "self-consistency",
    strategies: StrategiesOpt = None,
    estimator: EstimatorOpt = None,
    think: Annotated[bool, typer.Option(
        "--think", help="Think / no-think routing: probe with direct answers (no reasoning); a prompt whose "
                        "direct answers agree is answered, the others reason.")] = False,
    probe: Annotated[int, typer.Option(help="Samples per prompt before difficulty is estimated.")] = 2,
    horizon: Annotated[int, typer.Option(help="The most samples any one prompt may get.")] = 32,
    report: Annotated[Path | None, typer.Option(
        help="Where the allocation report goes (default: OUT.allocation.json).")] = None,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key: ApiKeyOpt = None,
    model_path: ModelPathOpt = None,
    price: PriceOpt = None,
    price_file: PriceFileOpt = None,
    scorer: ScorerOpt = "self-certainty",
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    system_prompt: SystemPromptOpt = None,
    seed: Annotated[int | None, typer.Option(help="Seed, for reproducible sampling.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Also print the rows as JSONL.")] = False,
    trace: Annotated[bool, typer.Option(help="Include the per-call trace in the rows.")] = False,
    field: Annotated[str | None, typer.Option(
        help="Prompt field of the records (default: question, prompt, problem or input).")] = None,
    concurrency: Annotated[int, typer.Option(help="Prompts answered at once within a round.")] = 4,
    timeout: TimeoutOpt = None,
    executor: Annotated[str, typer.Option(
        help="Where prompts run: local (this process) or ray (tasks on a Ray cluster; same answers and spend).")]
        = "local",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="The Ray cluster (default: $RAY_ADDRESS, else a new local instance).")] = None,
    models: ModelsOpt = None,
    cascade_samples: CascadeSamplesOpt = None,
    threshold: ThresholdOpt = None,
    confidence: ConfidenceOpt = "vote",
) -> None:
    """Answer a file of prompts under one total budget, shared out by difficulty."""
    console = Console(stderr=True, soft_wrap=True)
    if models is not None or policy == "cascade":
        cascade_batch_command(
            file, out, total_budget, policy, models, cascade_samples, threshold, confidence,
            sampling_options(max_tokens, temperature, top_p, system_prompt), scorer, field, concurrency,
            seed, timeout, report, json_out, trace, console,
            {"--base-url": base_url, "--model": model, "--model-path": model_path, "--price": price,
             "--price-file": price_file, "--strategies": strategies, "--estimator": estimator, "--think": think,
             "--executor": executor, "--ray-address": ray_address})
        return
    try:
        job = checked_job(file, out, total_budget, policy, algorithm,
                          sampling_options(max_tokens, temperature, top_p, system_prompt), scorer, strategies,
                          probe, horizon, concurrency, seed, field, estimator, executor, ray_address, think)
        backend = make_backend(base_url, model, api_key, model_path, price, price_file, timeout)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    assert out is not None
    run_batch_command(job, backend, out, report, json_out, trace, console)
