"""The sandbox seen through a ledger: each program run is one tool call, reserved before the
process starts and settled after it ends, whatever happened to it.

This is the tool-side twin of ``lm/metered.py``: algorithms never start a program themselves, so
``Budget.tool_calls`` holds for all of them through the ledger's one reserve/settle protocol.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from apportion.budget.ledger import Ask, CallRecord, Grant, Ledger
from apportion.budget.units import Usage
from apportion.tools.sandbox import ProgramRun, SandboxLimits, run_python

_TOOL_NAME = "python-sandbox"


class MeteredSandbox:
    """Runs programs under ``limits``, each charged one tool call to ``ledger``."""

    def __init__(self, ledger: Ledger, limits: SandboxLimits | None = None) -> None:
        self.ledger = ledger
        self.limits = limits or SandboxLimits()

    async def run(self, code: str) -> ProgramRun | None:
        """The program's run; None when the ledger refuses it (``ledger.exhausted_reason`` says
        why: no tool calls left, or the deadline). A run is charged once its process may have
        started, cancelled or not; only one that could not be started is given back."""
        grant = self.ledger.reserve(Ask.tool())
        if grant is None:
            return None
        limits = self.limits
        left = self.ledger.seconds_left()
        if left is not None and left < limits.wall_s:  # the program may not outlive the run's deadline
            limits = replace(limits, wall_s=max(left, 1e-3))
        started = time.monotonic()
        try:
            run = await run_python(code, limits)
        except asyncio.CancelledError:
            self._settle(grant, started, ("cancelled: the program was killed",), "cancelled")
            raise
        except BaseException:
            self.ledger.release(grant)
            raise
        self._settle(grant, started, (describe(run, limits),), run.fault)
        return run

    def _settle(self, grant: Grant, started: float, notes: tuple[str, ...], error: str | None) -> None:
        record = CallRecord(kind="tool", model=_TOOL_NAME, n_asked=1, n_granted=grant.n, max_tokens_asked=0,
                            max_tokens_granted=0, usage=Usage(tool_calls=1), usd=0.0,
                            latency_s=time.monotonic() - started, notes=notes, error=error)
        self.ledger.settle(grant, Usage(tool_calls=1), record)


def describe(run: ProgramRun, limits: SandboxLimits) -> str:
    """One line for the trace: how the run ended and what it printed last."""
    if run.timed_out:
        return f"timed out (limits: {limits.wall_s:g} s wall, {limits.cpu_seconds} s CPU)"
    if run.memory_exceeded:
        return f"passed its memory limit ({limits.memory_mb} MB)"
    if run.output_capped:
        return f"killed after {limits.output_bytes} bytes of output"
    last = next((line.strip() for line in reversed(run.stdout.splitlines()) if line.strip()), "")
    return f"exit {run.exit_code}" + (f", printed {last[:80]!r} last" if last else ", printed nothing")
