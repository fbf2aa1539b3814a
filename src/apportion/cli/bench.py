"""``apportion bench``: the accuracy-versus-spend grid, and the engine's own benchmarks."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from apportion.algorithms.prompting import PROMPT_MODES, parse_prompt_mode
from apportion.algorithms.steps import SearchOptions
from apportion.algorithms.stopping import parse_stop
from apportion.banks import open_bank
from apportion.bench.datasets import DATASETS, judge_for, load_dataset, system_prompt_for
from apportion.bench.grid import GridOptions, Row, canonical, is_search
from apportion.bench.harness import BenchOutcome, BenchSpec, check_run_dir, run_bench
from apportion.bench.peers import peer as peer_module
from apportion.bench.replay import bank_sampling
from apportion.bench.token_counts import fill_token_counts
from apportion.budget.units import Price
from apportion.cli._app import (
    EXIT_FAILURE,
    EXIT_USAGE,
    ApiKeyOpt,
    BaseUrlOpt,
    BenchConcurrencyOpt,
    DataDirOpt,
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
    bench_concurrency,
    checked_preflight,
    fail,
    make_backend,
    make_process_scorer,
    sampling_options,
)
from apportion.cli.bench_policies import run_policies
from apportion.errors import ApportionError, ConfigError
from apportion.lm.base import Backend
from apportion.lm.openai_http import CONTINUATION_MODES, OpenAIHTTPBackend

bench_app = typer.Typer(
    help="Accuracy-versus-spend over a dataset (no subcommand), or the engine's own benchmarks.",
    invoke_without_command=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.callback()
def bench(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(
        help=f"A dataset name ({', '.join(DATASETS)}) or a JSONL file.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N questions (after --offset).")] = None,
    offset: Annotated[int, typer.Option(help="Skip the dataset's first N questions (game24: --offset 900 "
                                             "asks ranks 901 on, the Tree-of-Thoughts set).")] = 0,
    algorithms: Annotated[str, typer.Option(help="Comma-separated algorithms.")] = "self-consistency,best-of-n",
    budgets: Annotated[str, typer.Option(help="Comma-separated generation budgets.")] = "1,2,4,8,16",
    question_field: Annotated[str | None, typer.Option(help="Question field of a JSONL dataset.")] = None,
    answer_field: Annotated[str | None, typer.Option(help="Gold-answer field of a JSONL dataset.")] = None,
    level_field: Annotated[str | None, typer.Option(help="Difficulty-level field of a JSONL dataset.")] = None,
    data_dir: DataDirOpt = None,
    bank: Annotated[Path | None, typer.Option(
        help="Replay this sample bank (ours, or the shared math_cot file) instead of sampling.")] = None,
    live: Annotated[bool, typer.Option(help="Run every cell live instead of replaying a bank.")] = False,
    orders: Annotated[int, typer.Option(help="Random sample orders per replayed cell.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<dataset>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue the run in --out: its sample bank, and its live cells from their journal.")] = False,
    journal_only: Annotated[bool, typer.Option(
        help="Write the rows of what the journal in --out holds and run nothing (a long grid stopped "
             "early: cells cut short are rows over the questions they answered).")] = False,
    concurrency: BenchConcurrencyOpt = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling and replay orders.")] = 0,
    peer: Annotated[list[str] | None, typer.Option(
        help="Also run a peer's own implementation: its_hub, optillm (repeatable).")] = None,
    peer_endpoint: Annotated[str | None, typer.Option(
        help="Where peers sample: 'replay' (the bank: identical samples) or 'live' (--base-url). "
             "Default: replay when there is a bank.")] = None,
    peer_orders: Annotated[int, typer.Option(help="Replay orders per peer cell.")] = 5,
    peer_algorithms: Annotated[str | None, typer.Option(
        help="Comma-separated algorithms for the peers (default: --algorithms).")] = None,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key: ApiKeyOpt = None,
    model_path: ModelPathOpt = None,
    price: PriceOpt = None,
    price_file: PriceFileOpt = None,
    scorer: ScorerOpt = "self-certainty",
    process_scorer: Annotated[str | None, typer.Option(
        "--process-scorer", help="What rates each step of the step-wise searches (required with one): 'judge' "
                                 "(the model judges each new step) or 'game24' (the Game of 24 verifier); other "
                                 "algorithms ignore it.")] = None,
    beam_width: Annotated[int | None, typer.Option(
        help="Step-wise searches: M, the next steps asked of each kept path or subtree (default 4).")] = None,
    aggregation: Annotated[str | None, typer.Option(
        help="Step-wise searches: a path's score from its step scores: last, min, product or mean "
             "(default last).")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Step-wise searches: the most steps a path may take (default 16).")] = None,
    continuation: Annotated[str | None, typer.Option(
        help="With --base-url: how a partial answer is continued (searches step by step): 'server' "
             "(vLLM/SGLang's continue_final_message, the default), 'chatml' (rendered here and sent to "
             "/completions: llama-cpp-python's server with a ChatML model such as Qwen), 'none'.")] = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    system_prompt: SystemPromptOpt = None,
    prompt_mode: Annotated[str, typer.Option(
        "--prompt-mode", help=f"How the question is worded when sampling ({', '.join(PROMPT_MODES)}; "
                              "e.g. 'cod:words=5'): the bank records it and the prompt sent.")] = "plain",
    timeout: TimeoutOpt = None,
    stop: Annotated[list[str] | None, typer.Option(
        "--stop", help="Also replay a stopping rule at the bank's full size, beside each replayed algorithm: "
                       "RULE[:key=value,...] (repeatable: one row per rule; never split on commas).")] = None,
    policy: Annotated[list[str] | None, typer.Option(
        "--policy", help="With --bank: compare allocation policies under one total budget instead of the grid "
                         "(comma-separated or repeatable; uniform is always included).")] = None,
    mean_budget: Annotated[str | None, typer.Option(
        "--mean-budget", help="With --policy: the budget per question on average, in any unit "
                              "('tokens=450', 'gen=8'; default half the bank's samples).")] = None,
    probe: Annotated[int, typer.Option(help="With --policy: samples per question before difficulty is "
                                            "estimated.")] = 2,
    estimator: Annotated[Path | None, typer.Option(
        help="With --policy: a learned difficulty estimator (`apportion bench train-estimator`).")] = None,
    think_bank: Annotated[Path | None, typer.Option(
        help="With --policy: a bank of direct answers (no reasoning) to the same questions; the probing "
             "policies probe with it and answer a question whose direct answers agree.")] = None,
) -> None:
    """Run algorithms x budgets over a dataset; write a run directory and print the table."""
    console = Console(stderr=True, soft_wrap=True)
    if ctx.invoked_subcommand is not None:
        # typer vendors its own click, so its ParameterSource enum is matched by name
        given = [name for name in ctx.params
                 if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        if given:
            fail(console, ConfigError(f"`bench {ctx.invoked_subcommand}` does not take the grid's options "
                                      f"({', '.join('--' + g.replace('_', '-') for g in given)})"), EXIT_USAGE)
        return
    try:
        if (dataset is None) == (bank is None):
            raise ConfigError("give --dataset (to sample) or --bank (to replay a bank), not both")
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
        if bank is not None:
            # --model-path stays: its tokenizer counts the tokens of a bank that stored none
            unused = [name for name in ("base_url", "model", "price_file", "resume", "live", "timeout",
                                        "question_field", "answer_field", "level_field", "data_dir",
                                        "max_tokens", "temperature", "top_p", "system_prompt", "prompt_mode",
                                        "offset", "continuation")
                      if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
            if unused:
                raise ConfigError("--bank replays recorded samples; these options would be unused: "
                                  + ", ".join("--" + u.replace("_", "-") for u in unused))
        given_bank = open_bank(bank) if bank is not None else None
        if system_prompt is None and dataset is not None:
            system_prompt = system_prompt_for(dataset)  # game24 asks for the expression, not "The answer is N"
        sampling = replace(sampling_options(max_tokens, temperature, top_p, system_prompt),
                           prompt_mode=parse_prompt_mode(prompt_mode))
        scorer_given = getattr(ctx.get_parameter_source("scorer"), "name", None) == "COMMANDLINE"
        if given_bank is not None:
            # a bank was drawn with its own settings: peers get the same prompt, and a bank with
            # its own scores (a reward model's) is scored by them unless told otherwise
            sampling = bank_sampling(given_bank.meta, sampling)
            if not scorer_given and given_bank.has_scores:
                scorer = "bank"
        grid_algorithms = tuple(_split(algorithms, "algorithms"))
        searched = [a for a in (*grid_algorithms, *(_split(peer_algorithms, "peer-algorithms") if peer_algorithms
                                                    else ())) if is_search(a)]
        search = _search_options(beam_width, aggregation, max_steps)
        if (process_scorer is not None or search is not None) and not searched:
            raise ConfigError("--process-scorer, --beam-width, --aggregation and --max-steps are the step-wise "
                              "searches' settings, and no algorithm here is one")
        if process_scorer is not None:
            make_process_scorer(process_scorer)  # an unknown name is a usage error now, not in every question
        options = GridOptions(
            algorithms=grid_algorithms,
            budgets=tuple(_ints(budgets)),
            sampling=sampling, scorer=scorer, live=live, orders=orders, seed=seed,
            concurrency=bench_concurrency(concurrency, base_url),
            stops=tuple(parse_stop(s) for s in stop or ()),
            process_scorer=partial(make_process_scorer, process_scorer) if process_scorer is not None else None,
            search=search, judge=judge_for(dataset) if dataset is not None else "gold",
        )
        if given_bank is not None:
            problems = [e.problem for e in given_bank.entries][:limit]
            given_bank.entries = given_bank.entries[: len(problems)]
            given_bank, why = fill_token_counts(given_bank, str(model_path) if model_path else None)
            if why is not None:
                console.print(f"[yellow]note:[/yellow] {why}")
            assert bank is not None
            name = str(given_bank.meta.get("dataset") or bank.stem)
            backend = None
        else:
            assert dataset is not None
            problems = load_dataset(dataset, data=data_dir, limit=limit, question_field=question_field,
                                    answer_field=answer_field, level_field=level_field, offset=offset)
            name = Path(dataset).stem if dataset.endswith(".jsonl") else dataset
            backend = _continued(make_backend(base_url, model, api_key, model_path, price, price_file, timeout),
                                 continuation)
        if policy:
            if given_bank is None:
                raise ConfigError("--policy replays a bank: give --bank")
            policies = [p.strip() for item in policy for p in item.split(",") if p.strip()]
            run_policies(given_bank, policies, _split(algorithms, "algorithms"), mean_budget, orders, seed,
                         "bank" if scorer == "bank" else "self-certainty", sampling, probe,
                         out or Path("runs") / f"{name}-policies-{datetime.now():%Y%m%d-%H%M%S}", Console(),
                         estimator, think_bank)
            return
        if mean_budget is not None:
            raise ConfigError("--mean-budget goes with --policy")
        peers = tuple(p.strip() for item in (peer or []) for p in item.split(",") if p.strip())
        for p in peers:
            peer_module(p)
        for a in _split(peer_algorithms, "peer-algorithms") if peer_algorithms else ():
            canonical(a)
        if peer_orders < 1:
            raise ConfigError(f"--peer-orders must be >= 1, got {peer_orders}")
        run_dir = out or Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        check_run_dir(run_dir, resume=resume or journal_only)
        spec = BenchSpec(problems, options, name, run_dir,
                         given_bank, resume, journal_only, peers, peer_endpoint, peer_orders,
                         tuple(_split(peer_algorithms, "peer-algorithms")) if peer_algorithms else None,
                         Price.parse(price) if price and given_bank is not None else None)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    if backend is not None:
        checked_preflight(backend, console)
    try:
        outcome = asyncio.run(_run(spec, backend, console))
    except ConfigError as exc:  # found once the run directory is read (a bank to resume drawn otherwise)
        fail(console, exc, EXIT_USAGE)
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
    stdout = Console()
    # Off a terminal rich assumes 80 columns and would fold every cell; a log file can be wide.
    _table(outcome.rows, outcome.summary, stdout if stdout.is_terminal else Console(width=170))
    if outcome.summary.get("tokens_estimated"):
        console.print(f"[yellow]note:[/yellow] token counts are estimated: {outcome.summary['tokens_estimated']}")
    for series in outcome.summary.get("anytime", []):
        console.print(f"anytime index: {_series_label(series)}: {_anytime_text(series)}")
    for failure in outcome.summary.get("peer_failures", []):
        console.print(f"[yellow]peer failed:[/yellow] {failure}")
    for skipped in outcome.summary.get("skipped", []):
        console.print(f"[yellow]not run:[/yellow] {skipped}")
    seen: set[tuple[str, str]] = set()
    for row in outcome.rows:
        for note in row.notes:
            if (row.label, note) not in seen:  # one line per curve for notes that every budget shares
                seen.add((row.label, note))
                console.print(f"[yellow]note:[/yellow] {row.label} @{row.budget}: {note}")
    console.print(f"wrote {spec.out}/summary.json (report: apportion report {spec.out})")


async def _run(spec: BenchSpec, backend: Backend | None, console: Console) -> BenchOutcome:
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            tasks: dict[str, TaskID] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            return await run_bench(spec, backend, progress=progress)
    finally:
        if backend is not None:
            await backend.aclose()


def _table(rows: list[Row], summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['dataset']}: {summary['questions']} questions, {summary['model']} "
                        f"({summary['backend']})")
    searched = any(r.steps is not None for r in rows)
    for column in ("system", "algorithm", "budget", "mode", "accuracy [95% CI]", "± orders", "in tok", "out tok",
                   "tok", *(["steps / trips / scoring"] if searched else []), "$ / question", "wall s"):
        table.add_column(column, justify="left" if column in ("system", "algorithm", "mode") else "right")
    for r in rows:
        figures = ("-" if r.steps is None else
                   " / ".join("-" if v is None else f"{v:.1f}" for v in (r.steps, r.round_trips, r.scoring_calls)))
        table.add_row(r.system, r.algorithm + (f" ({r.scorer})" if r.scorer else ""), str(r.budget), r.mode,
                      f"{100 * r.accuracy:.1f}% [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]",
                      "-" if r.accuracy_std is None else f"{100 * r.accuracy_std:.1f}",
                      f"{r.input_tokens:.0f}", f"{r.output_tokens:.0f}", f"{r.tokens:.0f}",
                      *([figures] if searched else []), f"{r.usd:.6f}",
                      ("~" if r.wall_estimated else "") + f"{r.wall_seconds:.1f}"
                      + (f" ({r.errors} err)" if r.errors else ""))
    console.print(table)
    if searched:
        console.print("steps / trips / scoring: a search's mean steps, round trips (the steps plus the rounds of "
                      "scoring that made calls) and process-scorer calls per question")


def _series_label(series: dict[str, Any]) -> str:
    return (f"{series['system']} {series['algorithm']}" + (f" ({series['scorer']})" if series["scorer"] else "")
            + f" @{','.join(str(b) for b in series['budgets'])}")


def _anytime_text(series: dict[str, Any]) -> str:
    per_gen, per_token = series["per_generation"], series["per_token"]
    gen = "-" if per_gen is None else f"{100 * per_gen:+.2f} pp per generation"
    tok = "no token counts" if per_token is None else f"{100_000 * per_token:+.3f} pp per 1k tokens"
    return f"{gen}, {tok}"


def check_report_path(out: Path) -> None:
    """A JSON report's path, checked before a benchmark runs (not after, with its figures lost)."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name for the JSON report")
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"--out {out}: {out.parent} is not a directory")


def _search_options(beam_width: int | None, aggregation: str | None, max_steps: int | None) -> SearchOptions | None:
    """The step-wise searches' settings where any was given (None: each search's defaults)."""
    if beam_width is None and aggregation is None and max_steps is None:
        return None
    defaults = SearchOptions()
    steps = defaults.steps if max_steps is None else replace(defaults.steps, max_steps=max_steps)
    return replace(defaults, beam_width=defaults.beam_width if beam_width is None else beam_width,
                   aggregation=aggregation or defaults.aggregation, steps=steps)


def _continued(backend: Backend, continuation: str | None) -> Backend:
    """``backend`` with ``--continuation`` (an HTTP backend's setting)."""
    if continuation is None:
        return backend
    if continuation not in CONTINUATION_MODES:
        raise ConfigError(f"--continuation must be one of {', '.join(CONTINUATION_MODES)}, got {continuation!r}")
    if not isinstance(backend, OpenAIHTTPBackend):
        raise ConfigError("--continuation is for a server (--base-url); the embedded model continues by itself")
    return OpenAIHTTPBackend(replace(backend.options, continuation=continuation))


def _split(text: str, what: str) -> list[str]:
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        raise ConfigError(f"--{what}: empty item in {text!r}")
    return parts


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in _split(text, "budgets")]
    except ValueError:
        raise ConfigError(f"--budgets must be whole numbers separated by commas, got {text!r}") from None


@bench_app.command("throughput")
def bench_throughput(
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per configuration.")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per sample.")] = 256,
    seed: Annotated[int, typer.Option(help="Base seed.")] = 0,
    prefix_tokens: Annotated[int, typer.Option(
        help="Tokens of the shared prefix (and of each independent prompt).")] = 300,
    concurrent_tokens: Annotated[int, typer.Option(
        help="Fixed output tokens per request in the concurrency and prefix rows.")] = 128,
    model_path: Annotated[Path | None, typer.Option(help="A GGUF instead of the embedded model.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/throughput.json"),
) -> None:
    """Embedded backend: tokens/s at n=1 and n=8, concurrent requests against sequential ones,
    shared prefixes against independent prompts, and self-consistency's wall time over a bare request."""
    from apportion.bench.throughput import ThroughputConfig, measure, write

    console = Console()
    try:
        check_report_path(out)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    try:
        backend = make_backend(None, None, None, model_path, None, None)
        report = asyncio.run(measure(backend, ThroughputConfig(repeats, max_tokens, seed, prefix_tokens,
                                                               concurrent_tokens)))
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
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
    if engine := report.get("engine"):
        console.print(f"engine: prefix hit rate {engine['prefix_hit_rate']:.1%} of prompt tokens, "
                      f"peak {engine['peak_cells']} KV cells and {engine['peak_active']} sequences, "
                      f"{engine['evictions']} prefix-cache evictions")
    console.print(f"wrote {out}")


@bench_app.command("overhead")
def bench_overhead(
    budgets: Annotated[str, typer.Option(help="Comma-separated generation budgets.")] = "1,2,4,8,16,32,64",
    concurrency: Annotated[str, typer.Option(help="Comma-separated questions in flight.")] = "1,4,16,64",
    questions: Annotated[int, typer.Option(help="Questions per cell.")] = 64,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per cell (medians are reported).")] = 3,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/overhead.json"),
) -> None:
    """The engine's own cost: apportion against an instant mock server, next to a bare HTTP client."""
    from apportion.bench import overhead

    console = Console(stderr=True, soft_wrap=True)
    try:
        check_report_path(out)
        config = overhead.OverheadConfig(budgets=tuple(_ints(budgets)), concurrencies=tuple(_ints(concurrency)),
                                         questions=questions, repeats=repeats)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    try:
        report = overhead.run(config)
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
    overhead.write(report, out)
    typer.echo(overhead.table(report))
    console.print(f"wrote {out}")


@bench_app.command("faults")
def bench_faults(
    questions: Annotated[int, typer.Option(help="Questions in the file answered.")] = 200,
    budget: Annotated[str, typer.Option(help="Each question's budget.")] = "gen=8,tokens=6000",
    concurrency: Annotated[int, typer.Option(help="Questions in flight at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="--timeout given to `apportion run` (seconds).")] = 2.0,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per sample.")] = 64,
    shares: Annotated[str | None, typer.Option(
        help="Fault mix as fault=weight pairs (default: half correct replies, the rest spread over every fault).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the server's fault draws and of sampling.")] = 0,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/faults.json"),
) -> None:
    """`apportion run --file` against a server that fails, hangs, truncates, omits usage and returns
    fewer and more choices: answered, failed cleanly, lost, budget violations, requests."""
    from apportion.bench.faults import run as faults

    console = Console(stderr=True, soft_wrap=True)
    try:
        check_report_path(out)
        config = faults.FaultRunConfig(questions, budget, concurrency, timeout, max_tokens, seed,
                                       faults.parse_shares(shares) if shares else dict(faults.DEFAULT_SHARES))
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    report = faults.run(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    typer.echo(faults.table(report))
    console.print(f"wrote {out}")
    if report["lost"] or report["budget_violations"] or report["undercharged"] or report["traceback"]:
        raise typer.Exit(EXIT_FAILURE)


@app.command("report")
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="A run directory written by `apportion bench`, or several over the same questions (a grid "
             "run in pieces), reported side by side.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the plots and page (default: RUN_DIR/report; "
                                                  "required with several runs).")] = None,
) -> None:
    """PNG plots and one self-contained HTML page for a benchmark run (or several side by side)."""
    from apportion.bench.report import write_report  # matplotlib is slow to import: only here

    console = Console(stderr=True, soft_wrap=True)
    try:
        files = write_report(run_dirs, out)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    for path in files.files:
        typer.echo(str(path))


@bench_app.command("fit")
def bench_fit(
    run: Annotated[Path, typer.Argument(help="A run directory of `apportion bench` (its results.jsonl).")],
    target: Annotated[float | None, typer.Option(help="Also say the spend each law needs for this accuracy.")]
    = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the questions.")] = 200,
    cache: Annotated[Path | None, typer.Option(help="A JSON file keeping fits per model, task and algorithm.")]
    = None,
) -> None:
    """Fit P(N) = a * N^b + c to each uniform curve of a run, with held-out errors and intervals."""
    from apportion.bench.fit import fit_run, save

    console = Console()
    try:
        if target is not None and not 0 < target <= 1:
            raise ConfigError(f"--target must be an accuracy in (0, 1], got {target}")
        fits = fit_run(run, target=target, bootstrap=bootstrap)
        out = save(run, fits, cache)
    except ApportionError as exc:
        fail(Console(stderr=True), exc, EXIT_USAGE)
    if not console.is_terminal:
        console = Console(width=170)
    grid = Table(title=f"Scaling laws P(N) = a * N^b + c: {run.name}")
    for column in ("curve", "N", "a", "b", "c [95%]", "fit rmse", "held-out", "largest from smaller",
                   "at 2x largest", *(["N for target"] if target is not None else [])):
        grid.add_column(column)
    for f in fits:
        law, ci = f.fit.law, f.fit.intervals.get("c")
        reach = "never" if f.target is None else f"{f.target.spend:,.3g}" + (" (extrapolated)" if f.target.extrapolated
                                                                              else "")
        grid.add_row(f.algorithm, f.unit, f"{law.a:.3f}", f"{law.b:.3f}",
                     f"{law.c:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""), f"{100 * law.rmse:.1f} pp",
                     "-" if f.fit.loo_error is None else f"{100 * f.fit.loo_error:.1f} pp",
                     "-" if f.fit.extrapolation_error is None else f"{100 * f.fit.extrapolation_error:.1f} pp",
                     f"{100 * f.beyond.accuracy:.1f}% (extrapolated)",
                     *([reach] if target is not None else []))
    console.print(grid)
    typer.echo(f"wrote {out}")


@bench_app.command("train-estimator")
def bench_train_estimator(
    bank: Annotated[list[Path], typer.Option("--bank", help="A sample bank with gold answers (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Where the estimator (JSON) goes.")],
    orders: Annotated[int, typer.Option(help="Sample orders per question: each gives every prefix's vote.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the orders.")] = 0,
) -> None:
    """Fit the learned difficulty estimator (how often a vote of a given shape is right) on banks."""
    from apportion.cli.bench_policies import train_estimator

    try:
        if orders < 1:
            raise ConfigError(f"--orders must be >= 1, got {orders}")
        estimator = train_estimator(bank, out, orders, seed)
    except ApportionError as exc:
        fail(Console(stderr=True), exc, EXIT_USAGE)
    typer.echo(f"trained on {estimator.examples} votes from {', '.join(estimator.trained_on)}; wrote {out}")


@bench_app.command("serve-load")
def bench_serve_load(
    requests: Annotated[int, typer.Option(help="Requests per row in the concurrent phase.")] = 400,
    concurrency: Annotated[int, typer.Option(help="Clients at once in the concurrent phase.")] = 32,
    sequential: Annotated[int, typer.Option(help="Requests per row sent one at a time (the latency figures).")] = 100,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats (medians are reported).")] = 2,
    out: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path("runs/serve_load.json"),
) -> None:
    """`apportion serve` over an instant backend against the backend served directly: requests per
    second and the latency added by a plain call, sc-1 and sc-8, without and with API keys."""
    from apportion.bench import serve_load

    console = Console(stderr=True, soft_wrap=True)
    try:
        check_report_path(out)
        config = serve_load.ServeLoadConfig(requests=requests, concurrency=concurrency, sequential=sequential,
                                            repeats=repeats)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    report = serve_load.run(config)
    serve_load.write(report, out)
    typer.echo(serve_load.table(report))
    console.print(f"wrote {out}")
    if not all(report["checks"].values()):
        fail(console, ApportionError(f"checks failed: {report['checks']}"), EXIT_FAILURE)
