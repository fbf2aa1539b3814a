"""``apportion run``: answer a prompt, or a file of prompts, within a budget."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from apportion.algorithms.base import check_budget_can_bind
from apportion.algorithms.beam_search import BeamSearchOptions
from apportion.algorithms.budget_forcing import BudgetForcingOptions
from apportion.algorithms.program_aided import ProgramAidedOptions
from apportion.algorithms.prompting import PROMPT_MODES, parse_prompt_mode
from apportion.algorithms.registry import ALGORITHMS, make_algorithm, needs_process_scorer
from apportion.algorithms.settings import parse_settings
from apportion.algorithms.stopping import STOP_RULES, parse_stop
from apportion.answers.freeform import ANSWER_MODES, check_answer_mode, parse_answer_mode
from apportion.batch import Item, answer_many, read_items
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
    make_process_scorer,
    make_scorer,
    sampling_options,
)
from apportion.cli._cascade import (
    CascadeSamplesOpt,
    CascadeSettings,
    ConfidenceOpt,
    ModelsOpt,
    ThresholdOpt,
    cascade_algorithm,
    cascade_backends,
    cascade_settings,
    checked_cascade_batch,
    run_cascade_batch_command,
)
from apportion.cli.batch import EstimatorOpt, PolicyOpt, StrategiesOpt, checked_job, run_batch_command
from apportion.errors import ApportionError, ConfigError, RunFailed
from apportion.files import ReplacingWriter, check_output, is_text
from apportion.lm.base import Backend
from apportion.result import Result


@app.command()
def run(
    prompt: Annotated[str | None, typer.Argument(
        help="The question to answer ('-' reads it from standard input). Omit with --file.")] = None,
    algorithm: Annotated[str, typer.Option("--algorithm", "-a",
        help=f"One of: {', '.join(ALGORITHMS)}; or cascade, over --models.")] = "self-consistency",
    budget: Annotated[str, typer.Option("--budget", "-b",
        help="Generations ('8'), or unit=value pairs: 'gen=8,tokens=4000,usd=0.01,seconds=30' "
             "(units: gen, input, output, tokens, usd, seconds, tool_calls).")] = "8",
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
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (JSONL with --file).")] = False,
    trace: Annotated[bool, typer.Option(help="Include the per-call trace in JSON output.")] = False,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSONL file of prompts to answer.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where --file writes its JSONL answers.")] = None,
    field: Annotated[str | None, typer.Option(
        help="Prompt field in --file records (default: question, prompt, problem or input).")] = None,
    concurrency: Annotated[int, typer.Option(help="Prompts answered at once with --file.")] = 4,
    timeout: TimeoutOpt = None,
    stop: Annotated[str | None, typer.Option(
        "--stop", help="Stop sampling early: RULE[:key=value,...], rules joined with '+' "
                       f"({', '.join(STOP_RULES)}), e.g. 'beta:threshold=0.95+give-up'.")] = None,
    prompt_mode: Annotated[str, typer.Option(
        "--prompt-mode", help=f"How the question is worded ({', '.join(PROMPT_MODES)}): "
                              "'tale[:estimator=model,budget=N,...]' states a token budget, "
                              "'cod[:words=N]' asks for short drafts.")] = "plain",
    answers: Annotated[str, typer.Option(
        "--answers", help=f"How replies are compared in the vote ({', '.join(ANSWER_MODES)}): 'math' reads a "
                          "final answer; 'text' compares whole replies, normalised (chat questions); 'judge' "
                          "also asks the model which replies say the same thing, charged as scoring.")] = "math",
    min_thinking_tokens: Annotated[int | None, typer.Option(
        help="budget-forcing: thinking shorter than this is continued with 'Wait' (default 0).")] = None,
    max_thinking_tokens: Annotated[int | None, typer.Option(
        help="budget-forcing: thinking is cut here and the model made to answer (default --max-tokens).")] = None,
    end_marker: Annotated[str | None, typer.Option(
        help="budget-forcing: what ends thinking, e.g. '</think>' ('' for the end of the reply only; "
             "default 'The answer is').")] = None,
    answer_cue: Annotated[str | None, typer.Option(
        help="budget-forcing: text after the end marker that makes the model answer (default '').")] = None,
    program_time_limit: Annotated[float | None, typer.Option(
        help="program-aided: seconds each program may run, wall and CPU (default 5).")] = None,
    program_memory_mb: Annotated[int | None, typer.Option(
        help="program-aided: memory each program's interpreter may use, in MB (default 512).")] = None,
    process_scorer: Annotated[str | None, typer.Option(
        "--process-scorer", help="Step-wise searches: what rates each step (required by beam-search, dvts, "
                                 "particle-filtering, particle-gibbs; tree-of-thoughts values its own states "
                                 "without one): 'judge' (the model "
                                 "judges each new step, through the same backend), 'game24' (the Game of 24 "
                                 "verifier), or a process reward model served by vLLM: "
                                 "'prm:base_url=URL,model=NAME[,key=value...]' (any PRMOptions field).")] = None,
    beam_width: Annotated[int | None, typer.Option(
        help="Step-wise searches: M, the next steps asked of each kept path or subtree, or ToT's thoughts "
             "per state (default 4).")] = None,
    aggregation: Annotated[str | None, typer.Option(
        help="Step-wise searches: a path's score from its step scores: last, min, product or mean "
             "(default last).")] = None,
    max_steps: Annotated[int | None, typer.Option(
        help="Step-wise searches: the most steps a path may take (default 16).")] = None,
    setting: Annotated[list[str] | None, typer.Option(
        "--set", help="An algorithm's own setting, KEY=VALUE (repeatable): e.g. resampling=multinomial, "
                      "ess_threshold=1, sweeps=3 (particle filtering, Gibbs); breadth=5 (tree-of-thoughts); "
                      "agents=4, rounds=1 (debate). An unknown key lists the algorithm's settings.")] = None,
    total_budget: Annotated[str | None, typer.Option(
        "--total-budget", help="With --file: one budget for the whole file, shared out by --policy "
                               "(the same as `apportion batch`); --budget is then unused.")] = None,
    policy: PolicyOpt = "compute-optimal",
    strategies: StrategiesOpt = None,
    estimator: EstimatorOpt = None,
    models: ModelsOpt = None,
    cascade_samples: CascadeSamplesOpt = None,
    threshold: ThresholdOpt = None,
    confidence: ConfidenceOpt = "vote",
) -> None:
    """Answer a prompt (or a file of prompts) within a budget."""
    console = Console(stderr=True, soft_wrap=True)
    try:
        if setting and (total_budget is not None or algorithm.lower() == "cascade"):
            raise ConfigError("--set reaches one algorithm's settings; --total-budget and cascades choose "
                              "their algorithms themselves")
        answer_mode = parse_answer_mode(answers)
        if answer_mode != "math" and (total_budget is not None or algorithm.lower() == "cascade"):
            raise ConfigError("--answers text|judge goes with one algorithm; --total-budget and cascades "
                              "read math answers to decide where the budget goes")
        cascade = _cascade(algorithm, models, cascade_samples, threshold, confidence, stop,
                           {"--base-url": base_url, "--model": model, "--model-path": model_path, "--price": price,
                            "--price-file": price_file})
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    if cascade is not None and total_budget is not None:
        try:
            if file is None:
                raise ConfigError("--total-budget shares one budget over a --file of prompts")
            cascade_job = checked_cascade_batch(cascade, file, out, total_budget, field, concurrency, seed)
            batch_sampling = sampling_options(max_tokens, temperature, top_p, system_prompt)
            batch_scorer = make_scorer(scorer)
        except ApportionError as exc:
            fail(console, exc, EXIT_USAGE)
        run_cascade_batch_command(cascade_job, batch_sampling, batch_scorer, timeout, None, json_out, trace, console)
        return
    if total_budget is not None:
        try:
            if file is None:
                raise ConfigError("--total-budget shares one budget over a --file of prompts")
            job = checked_job(file, out, total_budget, policy, algorithm,
                              sampling_options(max_tokens, temperature, top_p, system_prompt), scorer, strategies,
                              2, 32, concurrency, seed, field, estimator)
            backend = make_backend(base_url, model, api_key, model_path, price, price_file, timeout)
        except ApportionError as exc:
            fail(console, exc, EXIT_USAGE)
        assert out is not None
        run_batch_command(job, backend, out, None, json_out, trace, console)
        return
    try:
        parsed_budget = Budget.parse(budget)
        sampling = sampling_options(max_tokens, temperature, top_p, system_prompt)
        if (prompt is None) == (file is None):
            raise ConfigError("give either a PROMPT or --file (not both)")
        if concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
        items = None
        if file is not None:
            if out is None:
                raise ConfigError("--file needs --out, the JSONL file to write answers to")
            check_output(out, inputs=(file,))
            items = read_items(file, field)
        if prompt == "-":
            prompt = sys.stdin.read()
        if prompt is not None and not prompt.strip():
            raise ConfigError("the prompt is empty")
        if prompt is not None and not is_text(prompt):
            raise ConfigError("the prompt is not valid UTF-8")
        chosen_scorer = make_scorer(scorer)
        stopping = parse_stop(stop) if stop is not None else None
        sampling = replace(sampling, prompt_mode=parse_prompt_mode(prompt_mode), answers=answer_mode)
        forcing = _forcing_options(min_thinking_tokens, max_thinking_tokens, end_marker, answer_cue)
        programs = _program_options(program_time_limit, program_memory_mb)
        search = _search_options(beam_width, aggregation, max_steps)
        chosen_process = make_process_scorer(process_scorer) if process_scorer is not None else None
        settings = parse_settings(setting or ())
        others: list[Backend] = []
        if cascade is None:
            chosen = make_algorithm(algorithm, sampling, chosen_scorer, stopping, forcing=forcing,
                                    programs=programs, process_scorer=chosen_process,
                                    search=search, settings=settings)  # validates before any work
            if needs_process_scorer(chosen) and chosen_process is None:
                raise ConfigError(f"{chosen.name} needs --process-scorer, what rates each step")
            check_answer_mode(chosen)
            backend = make_backend(base_url, model, api_key, model_path, price, price_file, timeout)
            check_budget_can_bind(parsed_budget, backend, chosen)
        else:
            backends = cascade_backends(cascade, parsed_budget, timeout)
            backend, first = cascade_algorithm(cascade, backends, sampling)
            others = list(first.later)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    for each in (backend, *others):
        checked_preflight(each, console)

    def algorithm_for() -> Any:
        if cascade is not None:
            return cascade_algorithm(cascade, backends, sampling)[1]
        return make_algorithm(algorithm, sampling, chosen_scorer, stopping, forcing=forcing, programs=programs,
                              process_scorer=chosen_process, search=search, settings=settings)

    if items is not None:
        assert out is not None
        try:
            code = asyncio.run(_run_file(algorithm_for, backend, items, out, parsed_budget, concurrency, seed,
                                         json_out, trace, console, others))
        except ApportionError as exc:
            fail(console, exc, EXIT_FAILURE)
        if code:
            raise typer.Exit(code)
        return
    try:
        result = asyncio.run(_run_one(algorithm_for(), backend, prompt or "", parsed_budget, seed, others))
    except RunFailed as exc:  # nothing could be drawn: say why, and what the attempts spent
        if json_out:
            typer.echo(json.dumps(exc.result.to_dict(trace=trace), ensure_ascii=False))
        fail(console, ApportionError(f"{exc} (spent {_spent_line(exc.result)})"), EXIT_FAILURE)
    except ApportionError as exc:  # unreachable server, model missing upstream, backend failure
        fail(console, exc, EXIT_FAILURE)
    if json_out:
        typer.echo(json.dumps(result.to_dict(trace=trace), ensure_ascii=False))
    else:
        _render(result, Console())
    if result.partial:
        console.print(f"[yellow]partial:[/yellow] a failure ended the run early; the answer is the best of "
                      f"{len(result.candidates)} candidate(s) drawn before it: {result.error}")


def _cascade(algorithm: str, models: Path | None, samples: str | None, threshold: str | None, confidence: str,
             stop: str | None, single: dict[str, object]) -> CascadeSettings | None:
    """The cascade ``--algorithm cascade --models FILE`` asks for (None for any other algorithm)."""
    if algorithm.lower() != "cascade":
        if models is not None or samples is not None or threshold is not None:
            raise ConfigError("--models, --cascade-samples and --threshold go with --algorithm cascade")
        return None
    if models is None:
        raise ConfigError("--algorithm cascade needs --models, the models file (cheapest first)")
    given = [name for name, value in single.items() if value is not None]
    if given:
        raise ConfigError(f"the models file names the models and their prices; drop {', '.join(given)}")
    if stop is not None:
        raise ConfigError("a cascade takes no --stop: its thresholds decide when to stop")
    return cascade_settings(models, samples, threshold, confidence)


def _forcing_options(min_thinking: int | None, max_thinking: int | None, end_marker: str | None,
                     answer_cue: str | None) -> BudgetForcingOptions | None:
    """Budget forcing's settings where any was given (None: the algorithm's defaults)."""
    given: dict[str, object] = {k: v for k, v in (
        ("min_thinking_tokens", min_thinking), ("max_thinking_tokens", max_thinking),
        ("end_marker", end_marker), ("answer_cue", answer_cue)) if v is not None}
    if not given:
        return None
    if given.get("end_marker") == "":
        given["end_marker"] = None
    return BudgetForcingOptions(**given)  # type: ignore[arg-type]


def _search_options(beam_width: int | None, aggregation: str | None,
                    max_steps: int | None) -> BeamSearchOptions | None:
    """A step-wise search's settings where any was given (None: the search's defaults)."""
    if beam_width is None and aggregation is None and max_steps is None:
        return None
    defaults = BeamSearchOptions()
    steps = defaults.steps if max_steps is None else replace(defaults.steps, max_steps=max_steps)
    return BeamSearchOptions(beam_width=defaults.beam_width if beam_width is None else beam_width,
                             aggregation=aggregation or defaults.aggregation, steps=steps)


def _program_options(time_limit: float | None, memory_mb: int | None) -> ProgramAidedOptions | None:
    """Program-aided's sandbox limits where any was given (None: the algorithm's defaults)."""
    given: dict[str, Any] = {k: v for k, v in (("time_limit_s", time_limit), ("memory_mb", memory_mb))
                             if v is not None}
    return ProgramAidedOptions(**given) if given else None


async def _run_one(algorithm: Any, backend: Backend, prompt: str, budget: Budget,
                   seed: int | None, others: list[Backend] | None = None) -> Result:
    try:
        result: Result = await algorithm.run(backend, prompt, budget, seed=seed)
        return result
    finally:
        for each in (backend, *(others or ())):
            await each.aclose()


async def _run_file(algorithm_for: Any, backend: Backend, items: list[Item], out: Path, budget: Budget,
                    concurrency: int, seed: int | None, json_out: bool, trace: bool, console: Console,
                    others: list[Backend] | None = None) -> int:
    """Answers every item into ``out`` (through a ``.partial`` file, renamed when done); the exit
    code: 0 when every line was answered or ran out of budget, 1 when any failed or was invalid."""
    counts: Counter[str] = Counter()
    writer = ReplacingWriter(out)
    try:
        with writer, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=console, transient=False,
        ) as progress:
            task = progress.add_task("answering", total=len(items))
            async for outcome in answer_many(algorithm_for, backend, items, budget,
                                             concurrency=concurrency, seed=seed):
                row = outcome.to_dict(trace=trace)
                writer.write_line(row)
                counts[outcome.status] += 1
                counts["partial"] += bool(outcome.result is not None and outcome.result.partial)
                if outcome.error is not None:
                    label = "warning" if outcome.status in ("answered", "unanswered") else "error"
                    progress.console.print(f"[red]{label}:[/red] {outcome.error}")
                if json_out:
                    typer.echo(json.dumps(row, ensure_ascii=False))
                progress.advance(task)
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print(f"interrupted: the rows answered so far are in {writer.partial}"
                      + (f"; {out} is unchanged" if writer.replaced is not None else ""))
        raise
    finally:
        for each in (backend, *(others or ())):
            await each.aclose()
    console.print(_file_summary(counts, len(items), out, writer.replaced))
    return EXIT_FAILURE if counts["failed"] or counts["invalid"] or not (counts["answered"] or
                                                                          counts["unanswered"]) else 0


def _file_summary(counts: Counter[str], total: int, out: Path, replaced: int | None) -> str:
    parts = [f"{counts['answered']} of {total} answered"]
    if counts["partial"]:
        parts.append(f"{counts['partial']} of them partial (a failure cut the run short; best of what was drawn)")
    for status, words in (("unanswered", "gave no answer"), ("nothing drawn", "drew no sample (budget too small)"),
                          ("failed", "failed (their spend is in the rows)"), ("invalid", "were unreadable lines")):
        if counts[status]:
            parts.append(f"{counts[status]} {words}")
    parts.append(f"wrote {out}" + (f" (replacing its {replaced} earlier line(s))" if replaced is not None else ""))
    return "; ".join(parts)


def _spent_line(result: Result) -> str:
    s = result.spent
    return (f"{s.generations} generations, {s.input_tokens} input + {s.output_tokens} output tokens, "
            f"${float(s.usd):.6f}" + (f", {s.tool_calls} tool call(s)" if s.tool_calls else "")
            + (" (estimated)" if s.estimated else ""))


def _render(result: Result, console: Console) -> None:
    console.print(f"[bold]Answer:[/bold] {result.answer if result.answer is not None else '(none)'}")
    if result.distribution:
        label = "Votes" if result.algorithm in ("self-consistency", "budget-forcing", "program-aided") else "Scores"
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
        + (f" (+{s.continuations} continuations)" if s.continuations else "")
        + (f" (+{s.planning_generations} planning)" if s.planning_generations else "")
        + f", {s.input_tokens} input + {s.output_tokens} output tokens, ${float(s.usd):.6f}, "
        f"{s.seconds:.2f} s, {s.calls} call(s)" + (f", {s.tool_calls} tool call(s)" if s.tool_calls else "")
        + (" (estimated)" if s.estimated else "")
    )
    if result.search is not None:
        found = result.search
        console.print(f"[bold]Search:[/bold] {found.steps} step(s), {found.round_trips} round trip(s), "
                      f"{found.requests} step request(s), {found.scoring_calls} scoring call(s); "
                      f"chosen path: #{'-' if found.chosen is None else found.chosen + 1}")
    console.print(f"[bold]Budget:[/bold] {result.budget}"
                  + (f" - exhausted ({result.exhausted_reason})" if result.exhausted else "")
                  + (f" - stopped early by {result.stop_reason} after {s.generations} generation(s)"
                     if result.stopped_early else ""))
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


