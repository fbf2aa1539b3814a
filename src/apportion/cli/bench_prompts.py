"""``apportion bench prompts``: the plain prompt, TALE and Chain of Draft on the same questions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from apportion.bench.datasets import DATASETS, load_dataset
from apportion.bench.prompts import DEFAULT_MODES, PromptBenchConfig, run_prompt_bench, table, write
from apportion.cli._app import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ApiKeyOpt,
    BaseUrlOpt,
    BenchConcurrencyOpt,
    DataDirOpt,
    ModelOpt,
    ModelPathOpt,
    PriceFileOpt,
    PriceOpt,
    SystemPromptOpt,
    TimeoutOpt,
    bench_concurrency,
    checked_preflight,
    fail,
    make_backend,
    sampling_options,
)
from apportion.cli.bench import bench_app, check_report_path
from apportion.errors import ApportionError, ConfigError


@bench_app.command("prompts")
def bench_prompts(
    dataset: Annotated[str, typer.Option(help=f"A dataset name ({', '.join(DATASETS)}) or a JSONL file.")]
    = "mawps_singleop",
    limit: Annotated[int, typer.Option(help="Use only the first N questions.")] = 50,
    mode: Annotated[list[str] | None, typer.Option(
        "--mode", help="A prompt mode as --prompt-mode spells it (repeatable; default: plain, tale, cod).")] = None,
    samples: Annotated[int, typer.Option(help="Generations per question (self-consistency).")] = 1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most tokens per sample.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.0,
    system_prompt: SystemPromptOpt = None,
    data_dir: DataDirOpt = None,
    seed: Annotated[int, typer.Option(help="Seed; question i gets seed + i in every mode.")] = 0,
    concurrency: BenchConcurrencyOpt = None,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key: ApiKeyOpt = None,
    model_path: ModelPathOpt = None,
    price: PriceOpt = None,
    price_file: PriceFileOpt = None,
    timeout: TimeoutOpt = None,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/prompts.json"),
) -> None:
    """Accuracy and output tokens of each prompt mode against the plain prompt, live."""
    console = Console(stderr=True, soft_wrap=True)
    try:
        check_report_path(out)
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        sampling = sampling_options(max_tokens, temperature, 1.0 if temperature == 0 else 0.95, system_prompt)
        config = PromptBenchConfig(tuple(mode or DEFAULT_MODES), samples, sampling, seed,
                                   bench_concurrency(concurrency, base_url))
        problems = load_dataset(dataset, data=data_dir, limit=limit)
        backend = make_backend(base_url, model, api_key, model_path, price, price_file, timeout)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    checked_preflight(backend, console)

    async def go() -> dict[str, object]:
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                tasks: dict[str, TaskID] = {}

                def progress(stage: str, done: int, total: int) -> None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done)

                return await run_prompt_bench(backend, problems, config, progress)
        finally:
            await backend.aclose()

    try:
        report = asyncio.run(go())
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
    write(report, out)
    typer.echo(table(report))
    console.print(f"wrote {out}")
