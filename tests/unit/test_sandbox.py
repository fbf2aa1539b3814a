"""The sandbox: untrusted programs are bounded in time, memory, output and files, and leave nothing
running behind them."""

import asyncio
import time
from pathlib import Path

import pytest

from apportion.budget import Budget, Ledger
from apportion.errors import ConfigError
from apportion.tools import MeteredSandbox, SandboxLimits, run_python


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that has not reaped it yet counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def _gone(pid: int, within_s: float = 2.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_normal_program_is_read_whole():
    run = await run_python("import sys\nprint(6 * 7)\nprint('note', file=sys.stderr)")
    assert run.ok and run.fault is None
    assert (run.stdout, run.stderr, run.exit_code) == ("42\n", "note\n", 0)
    assert not (run.timed_out or run.memory_exceeded or run.output_capped)


async def test_an_infinite_loop_is_killed_at_the_time_limit():
    started = time.monotonic()
    run = await run_python("while True:\n    pass", SandboxLimits(wall_s=0.5))
    assert run.timed_out and not run.ok and run.fault == "timed out"
    assert time.monotonic() - started < 2.0


async def test_a_sleeping_program_is_killed_at_the_wall_limit():
    run = await run_python("import time\nprint('started', flush=True)\ntime.sleep(60)", SandboxLimits(wall_s=0.5))
    assert run.timed_out and run.wall_s < 2.0
    assert run.stdout == "started\n"  # what it printed before the limit is kept


async def test_cpu_time_is_limited_apart_from_wall_time():
    run = await run_python("while True:\n    pass", SandboxLimits(wall_s=20, cpu_s=1))
    assert run.timed_out and run.exit_code is not None and run.exit_code < 0
    assert run.wall_s < 5.0


async def test_a_memory_bomb_is_refused():
    started = time.monotonic()
    run = await run_python("x = bytearray(4 * 1024 ** 3)\nprint('allocated')", SandboxLimits(memory_mb=128))
    assert run.memory_exceeded and not run.ok and run.stdout == ""
    assert run.fault == "passed its memory limit"
    assert time.monotonic() - started < 5.0
    growing = await run_python("x = []\nwhile True:\n    x.append(' ' * 10 ** 6)", SandboxLimits(memory_mb=128))
    assert growing.memory_exceeded


async def test_huge_output_is_capped_and_the_writer_killed():
    started = time.monotonic()
    run = await run_python("while True:\n    print('x' * 1000)", SandboxLimits(wall_s=10, output_bytes=10_000))
    assert run.output_capped and not run.timed_out and not run.ok
    assert len(run.stdout) == 10_000
    assert time.monotonic() - started < 3.0  # killed at the cap, not at the time limit
    err = await run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)",
                           SandboxLimits(wall_s=10, output_bytes=5_000))
    assert err.output_capped and len(err.stderr) == 5_000


async def test_errors_and_exit_codes_come_back_as_faults():
    run = await run_python("print('before')\n1 / 0")
    assert run.exit_code == 1 and run.stdout == "before\n"
    assert run.fault == "exit 1: ZeroDivisionError: division by zero"
    assert (await run_python("import sys\nsys.exit(3)")).fault == "exit 3"


async def test_stdin_is_closed_and_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("APPORTION_TEST_SECRET", "do-not-leak")
    run = await run_python("print(input())")
    assert run.exit_code == 1 and "EOFError" in run.stderr
    run = await run_python("import os\nprint(os.environ.get('APPORTION_TEST_SECRET'))")
    assert run.stdout == "None\n"


async def test_the_working_directory_is_temporary_and_files_are_capped():
    run = await run_python("import os\nopen('out.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = run.stdout.strip()
    assert run.ok and workdir and not Path(workdir).exists()
    big = await run_python("open('big', 'wb').write(b'x' * 100_000)", SandboxLimits(file_bytes=1000))
    assert big.exit_code == 1 and "File too large" in big.stderr


async def test_programs_the_program_started_are_killed_with_it(tmp_path):
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
            "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n")
    run = await run_python(code)
    assert run.ok
    assert await _gone(int(pid_file.read_text()))


async def test_cancelling_a_run_kills_the_program(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\nwhile True:\n    pass"
    task = asyncio.create_task(run_python(code, SandboxLimits(wall_s=30)))
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _gone(int(pid_file.read_text()))


def test_limits_are_checked():
    for bad in ({"wall_s": 0}, {"wall_s": float("inf")}, {"cpu_s": -1}, {"memory_mb": 1}, {"output_bytes": 0}):
        with pytest.raises(ConfigError):
            SandboxLimits(**bad)
    assert SandboxLimits(wall_s=0.2).cpu_seconds == 1 and SandboxLimits(wall_s=2.5).cpu_seconds == 3


async def test_metered_runs_are_reserved_one_tool_call_each_and_refused_after():
    ledger = Ledger(Budget(tool_calls=2))
    sandbox = MeteredSandbox(ledger, SandboxLimits(wall_s=0.5))
    first = await sandbox.run("print(1)")
    second = await sandbox.run("while True:\n    pass")  # a fault is charged like any run
    assert first is not None and first.ok and second is not None and second.timed_out
    assert await sandbox.run("print(3)") is None
    assert ledger.exhausted_reason == "tool_calls: none left"
    spend = ledger.spend()
    assert (spend.tool_calls, spend.generations, spend.total_tokens, spend.calls) == (2, 0, 0, 2)
    assert [r.kind for r in ledger.trace] == ["tool", "tool"]
    assert ledger.trace[1].error == "timed out" and "timed out" in ledger.trace[1].notes[0]


async def test_a_cancelled_metered_run_is_charged():
    ledger = Ledger(Budget(tool_calls=3))
    task = asyncio.create_task(MeteredSandbox(ledger).run("while True:\n    pass"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.spend().tool_calls == 1 and ledger.remaining().tool_calls == 2


async def test_a_metered_run_does_not_outlive_the_deadline():
    ledger = Ledger(Budget(seconds=0.6, tool_calls=5))
    run = await MeteredSandbox(ledger, SandboxLimits(wall_s=30)).run("import time\ntime.sleep(60)")
    assert run is not None and run.timed_out and run.wall_s < 2.0


async def test_sandbox_overhead_is_small():
    # Start-up of a fresh interpreter dominates; on a 2-core machine about 20 ms a run.
    runs = 5
    started = time.monotonic()
    for _ in range(runs):
        assert (await run_python("print(1)")).ok
    assert (time.monotonic() - started) / runs < 1.0
