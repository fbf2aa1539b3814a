"""Serving over the OpenAI protocol: ``apportion replay-serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from apportion.cli._app import EXIT_USAGE, app, fail
from apportion.errors import ApportionError


@app.command("replay-serve")
def replay_serve(
    bank: Annotated[Path, typer.Argument(help="A sample bank (bank.jsonl of a run, or the shared math_cot file).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
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
