"""The ``apportion`` Typer application and what its commands share (backends, scorers, errors)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from apportion import __version__
from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, SamplingOptions
from apportion.budget.prices import PriceTable
from apportion.budget.units import Price
from apportion.errors import ApportionError, BackendUnavailable, ConfigError, ModelNotFound
from apportion.lm.base import Backend
from apportion.lm.llama_embedded import EmbeddedOptions, LlamaEmbeddedBackend
from apportion.lm.openai_http import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    HTTPOptions,
    OpenAIHTTPBackend,
)
from apportion.reward import SCORERS
from apportion.reward.base import OutcomeScorer
from apportion.reward.prm_http import PRMClient, PRMOptions
from apportion.reward.process import ProcessScorer
from apportion.reward.process_judge import JudgeProcessScorer
from apportion.reward.verifiers import CallableVerifier, game24_verifier

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


def make_backend(base_url: str | None, model: str | None, api_key: str | None, model_path: Path | None,
                 price: str | None, price_file: Path | None, timeout: str | None = None) -> Backend:
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
    connect, reply = parse_timeout(timeout)
    return OpenAIHTTPBackend(HTTPOptions(base_url=base_url, model=model, api_key=key, price=chosen,
                                         timeout_s=reply, connect_timeout_s=connect))


def parse_timeout(text: str | None) -> tuple[float, float]:
    """``--timeout``: "READ" or "CONNECT,READ" seconds (the defaults where not given)."""
    if text is None:
        return DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TIMEOUT_S
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v < float("inf") for v in values):
        raise ConfigError(f"--timeout must be READ or CONNECT,READ seconds > 0, got {text!r}")
    return (min(DEFAULT_CONNECT_TIMEOUT_S, values[0]), values[0]) if len(values) == 1 else (values[0], values[1])


def preflight(backend: Backend) -> None:
    """Fail before any work where the server is unreachable, is not an OpenAI API at that address,
    or does not serve the model (errors raised as they come: the caller picks the exit code)."""
    if not isinstance(backend, OpenAIHTTPBackend):
        return

    async def check() -> None:
        try:
            await backend.check()
        finally:
            await backend.aclose()

    asyncio.run(check())


def make_scorer(name: str) -> OutcomeScorer:
    factory = SCORERS.get(name)
    if factory is None:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(set(SCORERS)))}")
    return factory()




PROCESS_SCORERS: dict[str, Callable[[], ProcessScorer]] = {
    "judge": JudgeProcessScorer,  # the policy model judges each new step, through the same backend
    "game24": lambda: CallableVerifier(game24_verifier, name="game24"),
}
PRM_FIELDS = {f.name: f.type for f in fields(PRMOptions)}


def make_process_scorer(spec: str) -> ProcessScorer:
    """The process scorer of ``--process-scorer SPEC``: a name of ``PROCESS_SCORERS``, or
    ``prm:base_url=URL,model=NAME[,key=value...]`` for a process reward model served by vLLM's
    /pooling (any ``PRMOptions`` field). A clear ConfigError for anything else."""
    name, _, rest = spec.partition(":")
    if name == "prm":
        return PRMClient(_prm_options(rest))
    factory = PROCESS_SCORERS.get(spec)
    if factory is None:
        raise ConfigError(f"unknown process scorer {spec!r}; known: {', '.join(PROCESS_SCORERS)}, "
                          "prm:base_url=URL,model=NAME")
    return factory()


def _prm_options(spec: str) -> PRMOptions:
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in PRM_FIELDS:
            raise ConfigError(f"--process-scorer prm: {part!r} is not KEY=VALUE with KEY among {', '.join(PRM_FIELDS)}")
        if key in values:
            raise ConfigError(f"--process-scorer prm: {key} given twice")
        values[key] = _prm_value(key, value.strip())
    missing = [k for k in ("base_url", "model") if k not in values]
    if missing:
        raise ConfigError(f"--process-scorer prm needs {' and '.join(missing)} "
                          "(prm:base_url=http://host:8000,model=Qwen/Qwen2.5-Math-PRM-7B)")
    return PRMOptions(**values)  # type: ignore[arg-type]


def _prm_value(key: str, value: str) -> object:
    kind = str(PRM_FIELDS[key])
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise ConfigError(f"--process-scorer prm: {key} must be a number, got {value!r}") from None
    if kind == "bool":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"--process-scorer prm: {key} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    return value


def checked_preflight(backend: Backend, console: Console) -> None:
    """``preflight``, exiting 1 where the server is unreachable (it may be down) and 2 where the
    command line names something that is not there (a path without /v1, a model not served)."""
    try:
        preflight(backend)
    except BackendUnavailable as exc:
        fail(console, exc, EXIT_FAILURE)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)


def fail(console: Console, exc: Exception, code: int) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(str(exc))}")  # a message's own brackets are text, not styles
    raise typer.Exit(code) from None


# Options several commands share, declared once so their names and help stay the same everywhere.
BaseUrlOpt = Annotated[str | None, typer.Option(
    "--base-url", help="An OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1. Default: the embedded model.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="Model name on the server (required with --base-url).")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key for the server (default: $OPENAI_API_KEY).")]
ModelPathOpt = Annotated[Path | None, typer.Option(
    "--model-path", help="A GGUF file for the embedded backend instead of SmolLM2-135M-Instruct.")]
PriceOpt = Annotated[str | None, typer.Option(
    "--price", help="USD per million input,output tokens, e.g. '0.15,0.6', or input,cached input,output, "
                    "e.g. '0.15,0.075,0.6' (default: the built-in table).")]
PriceFileOpt = Annotated[Path | None, typer.Option(
    "--price-file", help="JSON file of model -> [input, output] or [input, cached input, output] prices.")]
ScorerOpt = Annotated[str, typer.Option(
    "--scorer", help=f"Outcome scorer for best-of-n: {', '.join(sorted(set(SCORERS)))}.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", help="Most tokens per sample.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")]
TimeoutOpt = Annotated[str | None, typer.Option(
    "--timeout", help=f"Seconds to wait for a server: READ (the whole reply) or CONNECT,READ "
                      f"(default {DEFAULT_CONNECT_TIMEOUT_S:g},{DEFAULT_TIMEOUT_S:g}). A seconds budget shortens it.")]
SystemPromptOpt = Annotated[str | None, typer.Option(
    "--system-prompt", help="System prompt ('' for none). Default asks for a final 'The answer is X' line.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder of the named datasets (default: shared/data).")]
BenchConcurrencyOpt = Annotated[int | None, typer.Option(
    "--concurrency", help="Questions in flight at once (default: 1 embedded, 4 over HTTP).")]


def bench_concurrency(concurrency: int | None, base_url: str | None) -> int:
    """The embedded backend decodes one request at a time; a server takes several."""
    return concurrency or (4 if base_url else 1)


def sampling_options(max_tokens: int, temperature: float, top_p: float, system_prompt: str | None) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           system_prompt=DEFAULT_SYSTEM_PROMPT if system_prompt is None else (system_prompt or None))
