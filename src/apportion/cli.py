"""The ``apportion`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apportion import __version__
from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, SamplingOptions, check_budget_can_bind
from apportion.algorithms.registry import ALGORITHMS, make_algorithm
from apportion.batch import answer_many, read_items
from apportion.budget.prices import PriceTable
from apportion.budget.units import Budget, Price
from apportion.errors import ApportionError, ConfigError, ModelNotFound
from apportion.lm.base import Backend
from apportion.lm.llama_embedded import EmbeddedOptions, LlamaEmbeddedBackend
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.result import Result
from apportion.reward import SCORERS
from apportion.reward.base import OutcomeScorer

app = typer.Typer(
    name="apportion",
    help="Budget-controlled inference-time scaling: spend a budget of generations, tokens, "
    "dollars or seconds on test-time algorithms and get the best answer with an exact account.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit codes: 2 for bad input (as click does for usage errors), 1 for failures at run time.
EXIT_USAGE = 2
EXIT_FAILURE = 1


def _version(value: bool) -> None:
    if value:
        typer.echo(f"apportion {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """apportion: budget-controlled inference-time scaling."""


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The question to answer ('-' reads it from standard input). Omit with --file.")] = None,
    algorithm: Annotated[str, typer.Option("--algorithm", "-a",
        help=f"One of: {', '.join(ALGORITHMS)}.")] = "self-consistency",
    budget: Annotated[str, typer.Option("--budget", "-b",
        help="Generations ('8'), or unit=value pairs: 'gen=8,tokens=4000,usd=0.01,seconds=30' "
             "(units: gen, input, output, tokens, usd, seconds).")] = "8",
    base_url: Annotated[str | None, typer.Option(
        help="An OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1. Default: the embedded model.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name on the server (required with --base-url).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="API key for the server (default: $OPENAI_API_KEY).")] = None,
    model_path: Annotated[Path | None, typer.Option(
        help="A GGUF file for the embedded backend instead of SmolLM2-135M-Instruct.")] = None,
    price: Annotated[str | None, typer.Option(
        help="USD per million input,output tokens, e.g. '0.15,0.6' (default: the built-in table).")] = None,
    price_file: Annotated[Path | None, typer.Option(help="JSON file of model -> [input, output] prices.")] = None,
    scorer: Annotated[str, typer.Option(
        help=f"Outcome scorer for best-of-n: {', '.join(sorted(set(SCORERS)))}.")] = "self-certainty",
    max_tokens: Annotated[int, typer.Option(help="Most tokens per sample.")] = 512,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    system_prompt: Annotated[str | None, typer.Option(
        help="System prompt ('' for none). Default asks for a final 'The answer is X' line.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed, for reproducible sampling.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (JSONL with --file).")] = False,
    trace: Annotated[bool, typer.Option(help="Include the per-call trace in JSON output.")] = False,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSONL file of prompts to answer.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where --file writes its JSONL answers.")] = None,
    field: Annotated[str | None, typer.Option(
        help="Prompt field in --file records (default: question, prompt, problem or input).")] = None,
    concurrency: Annotated[int, typer.Option(help="Prompts answered at once with --file.")] = 4,
) -> None:
    """Answer a prompt (or a file of prompts) within a budget."""
    console = Console(stderr=True)
    try:
        parsed_budget = Budget.parse(budget)
        sampling = SamplingOptions(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else (system_prompt or None),
        )
        if (prompt is None) == (file is None):
            raise ConfigError("give either a PROMPT or --file (not both)")
        if file is not None and out is None:
            raise ConfigError("--file needs --out, the JSONL file to write answers to")
        if prompt == "-":
            prompt = sys.stdin.read()
        if prompt is not None and not prompt.strip():
            raise ConfigError("the prompt is empty")
        chosen_scorer = _scorer(scorer)
        make_algorithm(algorithm, sampling, chosen_scorer)  # validates the name before any work
        backend = _backend(base_url, model, api_key, model_path, price, price_file)
        check_budget_can_bind(parsed_budget, backend)
    except ApportionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_USAGE) from None

    def algorithm_for() -> Any:
        return make_algorithm(algorithm, sampling, chosen_scorer)

    try:
        if file is not None:
            assert out is not None
            failed = asyncio.run(_run_file(algorithm_for, backend, file, out, field, parsed_budget,
                                           concurrency, seed, json_out, trace, console))
            if failed:
                raise typer.Exit(EXIT_FAILURE)
            return
        result = asyncio.run(_run_one(algorithm_for(), backend, prompt or "", parsed_budget, seed))
    except ApportionError as exc:  # unreachable server, model missing upstream, backend failure
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    if json_out:
        typer.echo(json.dumps(result.to_dict(trace=trace), ensure_ascii=False))
    else:
        _render(result, Console())


bench_app = typer.Typer(help="Benchmarks that print figures and write JSON.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("throughput")
def bench_throughput(
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per configuration.")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per sample.")] = 256,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    model_path: Annotated[Path | None, typer.Option(help="A GGUF instead of the embedded model.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/throughput.json"),
) -> None:
    """Embedded backend: tokens/s at n=1 and n=8, and self-consistency's wall time over a bare request."""
    from apportion.bench.throughput import ThroughputConfig, measure, write

    console = Console()
    try:
        backend = _backend(None, None, None, model_path, None, None)
        report = asyncio.run(measure(backend, ThroughputConfig(repeats, max_tokens, seed)))
    except ApportionError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(EXIT_FAILURE) from None
    write(report, out)
    table = Table(title=f"{report['model']} ({report['backend']}), {repeats} repeats, max_tokens={max_tokens}")
    for column in ("configuration", "median tokens/s", "median seconds", "mean tokens"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, row in report["summary"].items():
        if name != "ratios":
            table.add_row(name, f"{row['median_tokens_per_s']:.1f}", f"{row['median_seconds']:.2f}",
                          f"{row['mean_tokens']:.0f}")
    console.print(table)
    for name, value in report["summary"]["ratios"].items():
        console.print(f"{name}: {value:.2f}")
    console.print(f"wrote {out}")


def _backend(base_url: str | None, model: str | None, api_key: str | None, model_path: Path | None,
             price: str | None, price_file: Path | None) -> Backend:
    table = PriceTable.from_json(price_file) if price_file else PriceTable()
    if base_url is None:
        if model_path is not None and not model_path.is_file():
            raise ModelNotFound(f"model file not found: {model_path}")
        name = model or (model_path.stem if model_path else None)
        chosen = Price.parse(price) if price else (table.lookup(name) if name else None) or Price()
        embedded = LlamaEmbeddedBackend(EmbeddedOptions(
            model_path=str(model_path) if model_path else None, model_name=name, price=chosen))
        embedded.load()  # a missing model is a usage error, reported before any work
        return embedded
    if not model:
        raise ConfigError("--base-url needs --model, the model name the server serves")
    chosen = Price.parse(price) if price else (table.lookup(model) or Price())
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    return OpenAIHTTPBackend(HTTPOptions(base_url=base_url, model=model, api_key=key, price=chosen))


def _scorer(name: str) -> OutcomeScorer:
    factory = SCORERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(set(SCORERS)))}")
    return factory()


async def _run_one(algorithm: Any, backend: Backend, prompt: str, budget: Budget,
                   seed: int | None) -> Result:
    try:
        if isinstance(backend, OpenAIHTTPBackend):
            await backend.check()
        return await algorithm.run(backend, prompt, budget, seed=seed)
    finally:
        await backend.aclose()


async def _run_file(algorithm_for: Any, backend: Backend, file: Path, out: Path, field: str | None,
                    budget: Budget, concurrency: int, seed: int | None, json_out: bool, trace: bool,
                    console: Console) -> int:
    items = read_items(file, field)
    failed = 0
    try:
        if isinstance(backend, OpenAIHTTPBackend):
            await backend.check()
        with out.open("w", encoding="utf-8") as sink, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        ) as progress:
            task = progress.add_task("answering", total=len(items))
            async for outcome in answer_many(algorithm_for, backend, items, budget,
                                             concurrency=concurrency, seed=seed):
                row = outcome.to_dict(trace=trace)
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                sink.flush()
                if outcome.error is not None:
                    failed += 1
                    progress.console.print(f"[red]error:[/red] {outcome.error}")
                if json_out:
                    typer.echo(json.dumps(row, ensure_ascii=False))
                progress.advance(task)
    finally:
        await backend.aclose()
    console.print(f"{len(items) - failed} of {len(items)} answered; wrote {out}"
                  + (f"; {failed} failed" if failed else ""))
    return failed


def _render(result: Result, console: Console) -> None:
    console.print(f"[bold]Answer:[/bold] {result.answer if result.answer is not None else '(none)'}")
    if result.distribution:
        label = "Votes" if result.algorithm == "self-consistency" else "Scores"
        parts = [f"{answer} ({_fmt(weight)})" for answer, weight in result.distribution.items()]
        unanswered = sum(1 for c in result.candidates if c.answer is None)
        if unanswered:
            parts.append(f"(no answer) ({unanswered})")
        console.print(f"[bold]{label}:[/bold] " + ", ".join(parts))
    table = Table(show_edge=False, pad_edge=False)
    for column in ("#", "answer", "votes", "score", "tokens", "finish"):
        table.add_column(column, justify="right" if column != "answer" else "left")
    for i, c in enumerate(result.candidates, start=1):
        table.add_row(str(i), c.answer or "-", str(c.votes), "-" if c.score is None else f"{c.score:.3f}",
                      str(c.output_tokens), c.finish_reason)
    console.print(table)
    s = result.spent
    console.print(
        f"[bold]Spent:[/bold] {s.generations} generations"
        + (f" (+{s.scorer_generations} scoring)" if s.scorer_generations else "")
        + f", {s.input_tokens} input + {s.output_tokens} output tokens, ${float(s.usd):.6f}, "
        f"{s.seconds:.2f} s, {s.calls} call(s)" + (" (estimated)" if s.estimated else "")
    )
    console.print(f"[bold]Budget:[/bold] {result.budget}"
                  + (f" - exhausted ({result.exhausted_reason})" if result.exhausted else ""))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
