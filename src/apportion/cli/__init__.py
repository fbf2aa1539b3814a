"""The ``apportion`` command line: one module per group of commands, registered on one app."""

from apportion.cli import batch, bench, bench_cascade, bench_joint, bench_pareto, bench_prompts, keys, run, serve  # noqa: F401  (importing registers their commands)
from apportion.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
