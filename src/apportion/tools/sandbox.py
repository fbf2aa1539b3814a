"""Run an untrusted Python program in a separate, limited process.

The program runs in a fresh interpreter (``sys.executable -I``: no user site, no ``PYTHON*``
variables), in a temporary working directory removed afterwards, with stdin closed and an
environment that carries nothing of the caller's. Limits:

- wall time: the process group is killed at ``wall_s`` (children the program started included);
- CPU time and memory: rlimits (``RLIMIT_CPU``, ``RLIMIT_AS``) set in the child before the
  program's first line runs, soft and hard alike so that the program cannot raise them again;
- output: the process is killed as soon as it has written more than ``output_bytes`` to stdout
  or stderr (a runaway ``print`` loop costs milliseconds, not the whole time limit);
- files: ``RLIMIT_FSIZE`` caps any file it writes; no core dumps.

The limits are set by a few lines of bootstrap code run in the child before the program, not by
``preexec_fn``: code between fork and exec is unsafe in a process with threads (the embedded
model decodes in threads), and the bootstrap needs no such window.

It is not a security boundary: the program runs with the caller's user rights, may read what that
user may read and may open network connections. It bounds what a well-meant but wrong program
(a model's) can cost: time, memory, output, disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.errors import ApportionError, ConfigError

# The exit status the bootstrap gives a program that ran out of memory (a MemoryError nobody
# caught), so that a memory fault is told apart from any other error.
MEMORY_EXIT = 86
_READ_CHUNK = 65536
_PROGRAM = "main.py"

# Runs in the child with the limits as arguments: memory bytes, CPU seconds, file bytes. A hard
# limit already lower than asked is kept (an unprivileged process cannot raise it).
_BOOT = f"""
import os, resource, sys
def cap(which, want, slack=0):
    hard = resource.getrlimit(which)[1]
    top = want + slack if hard == resource.RLIM_INFINITY else min(want + slack, hard)
    resource.setrlimit(which, (min(want, top), top))
mem, cpu, fsize = (int(a) for a in sys.argv[1:4])
cap(resource.RLIMIT_AS, mem)
cap(resource.RLIMIT_CPU, cpu, 1)
cap(resource.RLIMIT_FSIZE, fsize)
cap(resource.RLIMIT_CORE, 0)
path = sys.argv[4]
sys.argv = sys.argv[4:]
with open(path, encoding="utf-8", errors="replace") as f:
    source = f.read()
try:
    exec(compile(source, path, "exec"), {{"__name__": "__main__", "__file__": path}})
except MemoryError:
    sys.stderr.write("MemoryError: the program passed its memory limit\\n")
    sys.stderr.flush()
    os._exit({MEMORY_EXIT})
"""


class SandboxError(ApportionError):
    """The sandbox could not start a program (no interpreter, no temporary directory)."""


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """What one program run may use."""

    wall_s: float = 5.0
    cpu_s: float | None = None
    """CPU seconds (whole, rounded up); None: ``wall_s``."""
    memory_mb: int = 512
    """Address space of the whole interpreter, not just the program's data: Python itself takes
    about 30 MB, numpy about 100 MB more."""
    output_bytes: int = 64_000
    """The most stdout, and the most stderr, kept; a program that writes more is killed."""
    file_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        if not (self.wall_s > 0 and math.isfinite(self.wall_s)):
            raise ConfigError(f"the sandbox's wall time must be > 0 seconds, got {self.wall_s}")
        if self.cpu_s is not None and not (self.cpu_s > 0 and math.isfinite(self.cpu_s)):
            raise ConfigError(f"the sandbox's CPU time must be > 0 seconds, got {self.cpu_s}")
        if self.memory_mb < 16:
            raise ConfigError(f"the sandbox's memory limit must be >= 16 MB, got {self.memory_mb}")
        if self.output_bytes < 1 or self.file_bytes < 0:
            raise ConfigError("the sandbox's output cap must be >= 1 byte and its file cap >= 0")

    @property
    def cpu_seconds(self) -> int:
        return max(1, math.ceil(self.cpu_s if self.cpu_s is not None else self.wall_s))


@dataclass(frozen=True, slots=True)
class ProgramRun:
    """What one program did. ``exit_code`` is negative where a signal ended it (-9: killed)."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    """It passed the wall-time or the CPU-time limit."""
    memory_exceeded: bool
    output_capped: bool
    """It wrote more than ``output_bytes``: killed, its output cut there."""
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.memory_exceeded or self.output_capped)

    @property
    def fault(self) -> str | None:
        """Why the run failed, in a few words (None: it did not)."""
        if self.timed_out:
            return "timed out"
        if self.memory_exceeded:
            return "passed its memory limit"
        if self.output_capped:
            return "wrote too much output"
        if self.exit_code is None or self.exit_code == 0:
            return None
        if self.exit_code < 0:
            return f"killed by signal {-self.exit_code}"
        last = next((line for line in reversed(self.stderr.splitlines()) if line.strip()), "")
        return f"exit {self.exit_code}" + (f": {last.strip()[:200]}" if last else "")


@dataclass(slots=True)
class _Capture:
    """One output stream, read as it comes and cut at ``cap`` bytes."""

    cap: int
    data: bytearray
    capped: bool = False

    async def drain(self, stream: asyncio.StreamReader, overflow: asyncio.Event) -> None:
        """Reads to the end, dropping what passes the cap: a stream left unread pauses its pipe,
        which then never sees the end of a killed program, and asyncio's wait() for the program
        waits for its pipes to close."""
        while chunk := await stream.read(_READ_CHUNK):
            if self.capped:
                continue
            room = self.cap - len(self.data)
            if len(chunk) > room:
                self.data += chunk[:room]
                self.capped = True
                overflow.set()
                continue
            self.data += chunk

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


async def run_python(code: str, limits: SandboxLimits | None = None) -> ProgramRun:
    """Run ``code`` as a Python program under ``limits``; never raises for what the program does
    (errors, hangs, memory and output bombs come back in the ProgramRun), only SandboxError when
    no process could be started. Cancelling it kills the program."""
    limits = limits or SandboxLimits()
    started = time.monotonic()
    try:
        workdir = tempfile.TemporaryDirectory(prefix="apportion-sandbox-", ignore_cleanup_errors=True)
    except OSError as exc:
        raise SandboxError(f"cannot create the sandbox's working directory: {exc}") from exc
    with workdir as tmp:
        program = Path(tmp) / _PROGRAM
        program.write_text(code, encoding="utf-8")
        args = [str(limits.memory_mb * 1024 * 1024), str(limits.cpu_seconds), str(limits.file_bytes), _PROGRAM]
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-c", _BOOT, *args, cwd=tmp, env=_environment(tmp),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:
            raise SandboxError(f"cannot start {sys.executable}: {exc}") from exc
        return await _watch(proc, limits, started)


async def _watch(proc: asyncio.subprocess.Process, limits: SandboxLimits, started: float) -> ProgramRun:
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(limits.output_bytes, bytearray()), _Capture(limits.output_bytes, bytearray())
    overflow = asyncio.Event()
    readers: asyncio.Future[Any] = asyncio.gather(out.drain(proc.stdout, overflow), err.drain(proc.stderr, overflow))
    capped: asyncio.Future[Any] = asyncio.ensure_future(overflow.wait())
    timed_out = False
    try:
        # Output past the cap ends the run at once; otherwise the pipes close when it exits.
        done, _ = await asyncio.wait({readers, capped}, timeout=limits.wall_s, return_when=asyncio.FIRST_COMPLETED)
        timed_out = not done
        if done and capped not in done:
            try:
                async with asyncio.timeout(max(0.0, started + limits.wall_s - time.monotonic())):
                    await proc.wait()
            except TimeoutError:  # it closed its output but went on running
                timed_out = True
    finally:
        _kill_group(proc)
        capped.cancel()
        # Killed, its pipes end at once: the readers drain them to the end, so they close and
        # wait() returns. Both are bounded all the same (a grandchild that escaped the group
        # could hold a pipe open).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REAP_S):
                await asyncio.shield(readers)
        readers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readers
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_REAP_S):
                await asyncio.shield(proc.wait())
    code = proc.returncode if proc.returncode is not None else -signal.SIGKILL
    timed_out = timed_out or code == -signal.SIGXCPU
    return ProgramRun(
        stdout=out.text(), stderr=err.text(), exit_code=code, timed_out=timed_out,
        memory_exceeded=code == MEMORY_EXIT, output_capped=(out.capped or err.capped) and not timed_out,
        wall_s=time.monotonic() - started)


_REAP_S = 5.0


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the program and whatever it started (its own session: start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _environment(workdir: str) -> dict[str, str]:
    """Nothing of the caller's environment (keys, tokens) reaches the program; numerical libraries
    are held to one thread, whose stacks would otherwise eat the address-space limit."""
    single = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8",
            **single}
