"""Serving over the OpenAI protocol: ``apportion serve`` (every algorithm, per request) and
``apportion replay-serve`` (a sample bank)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from apportion.answers.freeform import parse_answer_mode
from apportion.budget.units import Budget
from apportion.cli._app import (
    EXIT_USAGE,
    PROCESS_SCORERS,
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
    sampling_options,
)
from apportion.errors import ApportionError, ConfigError
from apportion.serve.quota_contract import LazyQuotaStore

if TYPE_CHECKING:
    from apportion.serve.dashboard import Dashboard

HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]


@app.command("serve")
def serve_algorithms(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    base_url: BaseUrlOpt = None,
    model: ModelOpt = None,
    api_key: ApiKeyOpt = None,
    model_path: ModelPathOpt = None,
    price: PriceOpt = None,
    price_file: PriceFileOpt = None,
    timeout: TimeoutOpt = None,
    default_budget: Annotated[str, typer.Option(
        "--default-budget", help="The budget of a request that names an algorithm but no budget: generations "
                                 "('8') or unit=value pairs, as --budget of `apportion run`.")] = "8",
    max_budget: Annotated[str, typer.Option(
        "--max-budget", help="The most one request may ask for; a unit a request leaves unlimited takes "
                             "this limit, a unit over it is refused with a 400 ('none': no limit).")]
    = "gen=64,tokens=1000000",
    max_request_tokens: Annotated[int, typer.Option(
        "--max-request-tokens", help="With API keys: the tokens reserved of a key's quota for a request whose "
                                     "budget sets none.")] = 100_000,
    max_body_bytes: Annotated[int, typer.Option(
        "--max-body-bytes", help="Larger request bodies are refused with a 413.")] = 1 << 20,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 0.95,
    system_prompt: SystemPromptOpt = None,
    scorer: ScorerOpt = "self-certainty",
    process_scorer: Annotated[str | None, typer.Option(
        "--process-scorer", help="The step-wise searches' process scorer where a request names none: 'judge', "
                                 "'game24', or a process reward model served by vLLM, "
                                 "'prm:base_url=URL,model=NAME[,key=value...]' (requests may then name it 'prm'). "
                                 "Requests may always name 'judge' and 'game24'.")] = None,
    answers: Annotated[str, typer.Option(
        "--answers", help="How candidates' answers are compared where a request does not say "
                          "(apportion.answers): math (a final answer read from each), text (whole replies, "
                          "normalised: free-form chat) or judge (the model clusters replies).")] = "math",
    keys: Annotated[bool, typer.Option(
        "--keys/--no-keys", help="Require an API key (`apportion keys create`) on every request, with its "
                                 "quotas; implied by --db.")] = False,
    db: Annotated[str | None, typer.Option(
        "--db", help="The key and quota store: an SQLite file or postgresql://... shared by replicas "
                     "(default with --keys: the SQLite file of `apportion keys`).")] = None,
    replica: Annotated[str | None, typer.Option(
        "--replica", help="This server's name among replicas sharing --db: a restart charges the open "
                          "reservations its previous run left (default: the host name).")] = None,
    dashboard: Annotated[bool, typer.Option(
        "--dashboard/--no-dashboard", help="The web page at /: requests in flight and recent, spend per key and "
                                           "per algorithm, the --runs plots (docs/serve.md).")] = True,
    runs: Annotated[list[Path] | None, typer.Option(
        "--runs", help="A run directory of `apportion bench` whose accuracy-versus-spend plot the dashboard "
                       "shows (repeat for several).")] = None,
    dashboard_token: Annotated[str | None, typer.Option(
        "--dashboard-token", envvar="APPORTION_DASHBOARD_TOKEN",
        help="The dashboard's admin credential, needed from everywhere (open /?token=TOKEN once). Without it a "
             "server with API keys shows its dashboard on the loopback interface only.")] = None,
) -> None:
    """Serve every algorithm over the OpenAI protocol: each request runs one under a budget (docs/serve.md).

    Max tokens, temperature, top-p and the system prompt are the defaults for what a request leaves unset."""
    from apportion.serve import serve
    from apportion.serve.algorithm_app import ServeOptions, algorithm_app
    from apportion.serve.dashboard import with_dashboard
    from apportion.serve.metrics import MetricsOptions, ServeMetrics, with_metrics

    console = Console(stderr=True, soft_wrap=True)
    try:
        offered = dict(PROCESS_SCORERS)
        default_process = None
        if process_scorer is not None:
            make_process_scorer(process_scorer)  # a malformed spec is refused now, not per request
            default_process = process_scorer if process_scorer in offered else "prm"
            if default_process == "prm":
                offered["prm"] = lambda: make_process_scorer(process_scorer)
        options = ServeOptions(
            default_budget=Budget.parse(default_budget),
            max_budget=None if max_budget.strip().lower() in ("none", "") else Budget.parse(max_budget),
            max_request_tokens=max_request_tokens, max_body_bytes=max_body_bytes,
            sampling=replace(sampling_options(max_tokens, temperature, top_p, system_prompt),
                             answers=parse_answer_mode(answers)),
            scorer=scorer, process_scorer=default_process)
        board = _dashboard(dashboard, runs, dashboard_token)  # a bad run directory stops it before anything starts
        backend = make_backend(base_url, model, api_key, model_path, price, price_file, timeout)
        quota = _quota_store(db, replica, console) if keys or db is not None else None
        metrics = ServeMetrics(MetricsOptions(by_key=quota is not None))
        served = with_metrics(algorithm_app(backend, options, quota=quota,
                                            observers=[metrics, *([board.log] if board is not None else [])],
                                            process_scorers=offered), metrics)
        if board is not None:
            served = with_dashboard(served, board, keys=quota is not None)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    checked_preflight(backend, console)
    console.print(f"serving {backend.model} with every algorithm on http://{host}:{port}/v1"
                  + (" (API keys required)" if quota is not None else ""))
    if board is not None:
        console.print(f"dashboard on http://{host}:{port}/" + (
            " (open /?token=<--dashboard-token> once)" if dashboard_token is not None
            else " (loopback clients only: API keys are required)" if quota is not None else ""))
    serve(served, host=host, port=port, log_level="warning")


@app.command("replay-serve")
def replay_serve(
    bank: Annotated[Path, typer.Argument(help="A sample bank (bank.jsonl of a run, or the shared math_cot file).")],
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    seed: Annotated[int, typer.Option(help="Seed of the order each question's samples are served in.")] = 0,
    model: Annotated[str | None, typer.Option(help="Model name to serve (default: the bank's).")] = None,
) -> None:
    """Serve a sample bank as an OpenAI-compatible model: recorded samples, without replacement."""
    from apportion.serve import replay_app, serve

    console = Console(stderr=True, soft_wrap=True)
    try:
        served = replay_app(bank, seed=seed, model=model)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    console.print(f"serving {bank} on http://{host}:{port}/v1")
    serve(served, host=host, port=port, log_level="warning")


def _dashboard(enabled: bool, runs: list[Path] | None, token: str | None) -> Dashboard | None:
    from apportion.serve.dashboard import Dashboard, DashboardOptions

    if not enabled:
        if runs or token is not None:
            raise ConfigError("--runs and --dashboard-token are the dashboard's: drop --no-dashboard")
        return None
    return Dashboard(DashboardOptions(runs=tuple(runs or ()), token=token))


def _quota_store(db: str | None, replica: str | None, console: Console) -> LazyQuotaStore:
    """The store requests will use (opened in the server's own loop), after charging what a
    previous run of this server left reserved when it stopped mid-request."""
    from apportion.serve.keys import QuotaStoreOptions, open_key_store

    options = QuotaStoreOptions() if replica is None else QuotaStoreOptions(owner=replica)

    async def recovered() -> int:
        store = await open_key_store(db, options)
        try:
            return await store.recover()
        finally:
            await store.aclose()

    charged = asyncio.run(recovered())  # also checks the store opens: a bad --db is a usage error now
    if charged:
        console.print(f"charged {charged} reservation(s) left open by a previous run at their grant")
    return LazyQuotaStore(lambda: open_key_store(db, options))
