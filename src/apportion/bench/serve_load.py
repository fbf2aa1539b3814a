"""``apportion bench serve-load``: what ``apportion serve`` adds over calling its backend directly.

One server process (uvicorn on 127.0.0.1, as ``apportion serve`` runs it) serves three apps, each over
its own ``InstantBackend`` (every request answered at once, n honoured, distinct texts per sample):

- ``/direct``: ``openai_app``, the backend behind the bare OpenAI protocol: the baseline;
- ``/open``: ``algorithm_app`` with the ``/metrics`` observer, as ``apportion serve`` serves it;
- ``/keyed``: the same with API keys, a real SQLite key store (``open_key_store`` on a temporary
  file): authenticate, reserve and settle per request, each a database transaction.

Rows: the direct backend at n=1 and n=8; a plain call (no algorithm), self-consistency with 1 and 8
generations (``sc-1``, ``sc-8``: one call with n=1 or n=8 each), without and with keys. Each row is
compared with the direct row that makes the same backend call (n=1 or n=8). For each row, on fresh
connections, after a warm-up:

- ``sequential``: requests one at a time, one connection: the latency of one request, median and
  90th percentile, and the added latency (median minus the baseline's median);
- ``concurrent``: ``requests`` requests from ``concurrency`` clients at once: requests per second,
  latency percentiles under load, and the server process's CPU time per request (from /proc, where
  there is one: less disturbed than wall time by what else the machine runs).

Repeats are interleaved (every row once, then again) and each figure is the median over repeats.
The client is this process, on raw keep-alive connections (a minimal HTTP/1.1 client: httpx would
cost about as much CPU per request as the server it measures), and has a core of its own only where
the machine has two free: on a loaded machine the figures are the machine's, and the report records
its load average.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from apportion.bench.mock_server import MOCK_MODEL, REPLY_TOKENS, stop_process
from apportion.errors import ConfigError

_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0
_KEY_NAME = "bench"


@dataclass(frozen=True, slots=True)
class ServeLoadConfig:
    requests: int = 400
    """Requests per row and repeat in the concurrent phase."""
    concurrency: int = 32
    """Clients at once in the concurrent phase (each on a connection of its own)."""
    sequential: int = 100
    """Requests per row and repeat sent one at a time."""
    repeats: int = 2
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "sequential", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.max_tokens < REPLY_TOKENS:
            raise ConfigError(f"max_tokens must be >= {REPLY_TOKENS} (the instant backend's reply), got "
                              f"{self.max_tokens}")


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    mount: str
    """``direct``, ``open`` or ``keyed``."""
    model: str
    n: int
    """The backend call's n: the direct row with the same n is the baseline."""


ROWS = (
    Row("direct n=1", "direct", MOCK_MODEL, 1),
    Row("direct n=8", "direct", MOCK_MODEL, 8),
    Row("plain", "open", MOCK_MODEL, 1),
    Row("sc-1", "open", f"sc-1/{MOCK_MODEL}", 1),
    Row("sc-8", "open", f"sc-8/{MOCK_MODEL}", 8),
    Row("plain + keys", "keyed", MOCK_MODEL, 1),
    Row("sc-1 + keys", "keyed", f"sc-1/{MOCK_MODEL}", 1),
    Row("sc-8 + keys", "keyed", f"sc-8/{MOCK_MODEL}", 8),
)


# -- the server process ----------------------------------------------------------------------------


def targets_app(db: str) -> Any:
    """The three apps (``/direct``, ``/open``, ``/keyed``) of the server process; ``db`` is the key store."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from apportion.bench.mock_server import InstantBackend
    from apportion.serve.algorithm_app import algorithm_app
    from apportion.serve.keys import open_key_store
    from apportion.serve.metrics import MetricsOptions, ServeMetrics, with_metrics
    from apportion.serve.openai_app import openai_app
    from apportion.serve.quota_contract import LazyQuotaStore

    open_metrics, keyed_metrics = ServeMetrics(), ServeMetrics(MetricsOptions(by_key=True))
    quota = LazyQuotaStore(lambda: open_key_store(db))
    return Starlette(routes=[
        Mount("/direct", app=openai_app(InstantBackend())),
        Mount("/open", app=with_metrics(algorithm_app(InstantBackend(), observers=[open_metrics]), open_metrics)),
        Mount("/keyed", app=with_metrics(algorithm_app(InstantBackend(), quota=quota, observers=[keyed_metrics]),
                                         keyed_metrics)),
    ])


def serve_targets() -> None:
    """Entry point of the server process (``sys.argv[1]``: the key store): bind, print the port, serve."""
    import uvicorn

    from apportion.serve.runner import bind_free_port, uvicorn_config

    sock = bind_free_port()
    print(sock.getsockname()[1], flush=True)  # the parent reads this one line
    uvicorn.Server(uvicorn_config(targets_app(sys.argv[1]))).run(sockets=[sock])


class TargetServer:
    """The server process: apart from the client, so that the two do not take turns on one GIL."""

    def __init__(self, db: str) -> None:
        self._db = db
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the server is not running")
        return self._process.pid

    def __enter__(self) -> TargetServer:
        code = "from apportion.bench.serve_load import serve_targets; serve_targets()"
        self._process = subprocess.Popen([sys.executable, "-c", code, self._db], stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise RuntimeError(f"the benchmark's server did not start (it said {line!r}; its errors are above)")
        self.port = int(line)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/open/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the benchmark's server did not answer /health")
            time.sleep(0.05)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, _STOP_TIMEOUT_S)


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time of a process (Linux's /proc), None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces: fields after it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the client ------------------------------------------------------------------------------------


def _body(row: Row, i: int, config: ServeLoadConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": row.model, "max_tokens": config.max_tokens, "seed": config.seed + i,
                            "messages": [{"role": "user", "content": f"Question {i}: Tom has {i % 97} apples and "
                                          f"gets {i % 13 + 2} more. How many apples does he have?"}]}
    if row.mount == "direct" and row.n > 1:
        body["n"] = row.n
    return body


@dataclass(slots=True)
class _Phase:
    latencies: list[float]
    wall_s: float
    errors: int
    cpu_s: float | None


class _Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to post JSON and read
    a reply with a Content-Length. httpx costs the client about as much CPU per request as the whole
    server does here, and on a machine of two cores the client would set the pace it measures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self._reader, self._writer, self._head = reader, writer, head

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str]) -> _Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Content-Type: application/json",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return cls(reader, writer, ("\r\n".join(lines) + "\r\n").encode())

    async def post(self, body: bytes) -> tuple[int, bytes]:
        self._writer.write(self._head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        length = next((int(v) for k, _, v in (h.partition(":") for h in header_lines)
                       if k.strip().lower() == "content-length"), None)
        if length is None:
            raise RuntimeError(f"a reply without Content-Length: {head!r}")
        return int(status_line.split(" ", 2)[1]), await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


async def _phase(connections: Sequence[_Connection], bodies: Sequence[bytes], pid: int) -> _Phase:
    latencies: list[float] = []
    errors = 0
    cursor = iter(bodies)

    async def worker(connection: _Connection) -> None:
        nonlocal errors
        for body in cursor:  # one shared iterator: each worker takes the next body as soon as it is free
            started = time.perf_counter()
            status, reply = await connection.post(body)
            latencies.append(time.perf_counter() - started)
            if status != 200 or b'"choices"' not in reply:
                errors += 1

    gc.collect()
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    wall = time.perf_counter() - started
    cpu_after = cpu_seconds(pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return _Phase(latencies, wall, errors, cpu)


async def _measure_row(port: int, pid: int, row: Row, config: ServeLoadConfig, secret: str,
                       repeat: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {secret}"} if row.mount == "keyed" else {}
    path = f"/{row.mount}/v1/chat/completions"
    first = repeat * (config.sequential + config.requests + config.concurrency)

    def bodies(offset: int, count: int) -> list[bytes]:
        return [json.dumps(_body(row, first + offset + i, config)).encode() for i in range(count)]

    connections = [await _Connection.open(port, path, headers) for _ in range(config.concurrency)]
    try:
        await _phase(connections, bodies(0, config.concurrency), pid)  # warm-up
        sequential = await _phase(connections[:1], bodies(config.concurrency, config.sequential), pid)
        concurrent = await _phase(connections, bodies(config.concurrency + config.sequential, config.requests), pid)
    finally:
        for connection in connections:
            await connection.close()
    return {
        "sequential_ms": _spread(sequential.latencies),
        "concurrent_ms": _spread(concurrent.latencies),
        "rps": config.requests / concurrent.wall_s,
        "server_cpu_ms_per_request": None if concurrent.cpu_s is None else concurrent.cpu_s / config.requests * 1e3,
        "errors": sequential.errors + concurrent.errors,
    }


def _spread(seconds: Sequence[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return {"p50": statistics.median(ms), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ms)}


async def _create_key(db: str) -> str:
    from apportion.serve.keys import KeySpec, open_key_store

    store = await open_key_store(db)
    try:
        _, secret = await store.create_key(KeySpec(_KEY_NAME))  # no quota: nothing is refused
    finally:
        await store.aclose()
    return secret


async def _usage_requests(db: str) -> int:
    from apportion.serve.keys import open_key_store

    store = await open_key_store(db)
    try:
        return (await store.usage(_KEY_NAME)).spent.requests
    finally:
        await store.aclose()


def run(config: ServeLoadConfig | None = None) -> dict[str, Any]:
    config = config or ServeLoadConfig()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="apportion-serve-load-") as tmp:
        db = str(Path(tmp) / "keys.db")
        secret = asyncio.run(_create_key(db))
        runs: dict[str, list[dict[str, Any]]] = {row.name: [] for row in ROWS}
        started = time.perf_counter()
        with TargetServer(db) as server:
            for repeat in range(config.repeats):
                for row in ROWS:
                    runs[row.name].append(asyncio.run(_measure_row(server.port, server.pid, row, config, secret,
                                                                   repeat)))
        elapsed = time.perf_counter() - started
        keyed_requests = asyncio.run(_usage_requests(db))
    rows = [_row_summary(row, runs[row.name]) for row in ROWS]
    by_name = {r["name"]: r for r in rows}
    for row, summary in zip(ROWS, rows, strict=True):
        base = by_name[f"direct n={row.n}"]
        summary["baseline"] = base["name"]
        summary["added_ms_sequential_p50"] = summary["sequential_ms"]["p50"] - base["sequential_ms"]["p50"]
        summary["added_ms_concurrent_p50"] = summary["concurrent_ms"]["p50"] - base["concurrent_ms"]["p50"]
        summary["rps_ratio"] = summary["rps"] / base["rps"]
        cpu, base_cpu = summary["server_cpu_ms_per_request"], base["server_cpu_ms_per_request"]
        summary["added_server_cpu_ms_per_request"] = None if cpu is None or base_cpu is None else cpu - base_cpu
    per_keyed_run = config.concurrency + config.sequential + config.requests
    expected_keyed = per_keyed_run * config.repeats * sum(row.mount == "keyed" for row in ROWS)
    return {
        "config": {**asdict(config), "rows": [asdict(r) for r in ROWS]},
        "machine": {"cpu_count": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": _loadavg(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "server_fast_paths_installed": {m: importlib.util.find_spec(m) is not None
                                                    for m in ("uvloop", "httptools")}},
        "rows": rows,
        "checks": {"no_errors": all(r["errors"] == 0 for r in rows),
                   "every_keyed_request_charged": keyed_requests == expected_keyed},
        "keyed_requests_charged": keyed_requests,
        "seconds": elapsed,
    }


def _row_summary(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(path: Sequence[str]) -> float | None:
        values = []
        for run in runs:
            value: Any = run
            for part in path:
                value = value[part]
            if value is not None:
                values.append(value)
        return statistics.median(values) if values else None

    return {
        "name": row.name, "mount": row.mount, "model": row.model, "n": row.n,
        "sequential_ms": {q: median(("sequential_ms", q)) for q in ("p50", "p90", "p99", "mean")},
        "concurrent_ms": {q: median(("concurrent_ms", q)) for q in ("p50", "p90", "p99", "mean")},
        "rps": median(("rps",)),
        "server_cpu_ms_per_request": median(("server_cpu_ms_per_request",)),
        "errors": sum(run["errors"] for run in runs),
        "repeats": runs,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def write(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def table(report: dict[str, Any]) -> str:
    """The rows as a Markdown table."""
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    head = ("| row | baseline | 1-at-a-time p50 ms | added ms | rps | rps / baseline | p50 ms under load "
            "| p99 ms under load | server CPU ms/req | added CPU ms/req | errors |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['baseline']} | {num(r['sequential_ms']['p50'])} | "
            f"{num(r['added_ms_sequential_p50'])} | {num(r['rps'], 0)} | {num(r['rps_ratio'])} | "
            f"{num(r['concurrent_ms']['p50'])} | {num(r['concurrent_ms']['p99'])} | "
            f"{num(r['server_cpu_ms_per_request'])} | {num(r['added_server_cpu_ms_per_request'])} | {r['errors']} |")
    machine = report["machine"]
    c = report["config"]
    lines.append("")
    lines.append(f"{c['requests']} requests from {c['concurrency']} clients and {c['sequential']} one at a time per "
                 f"row, {c['repeats']} repeat(s), medians; {machine['cpu_count']} CPUs, load average "
                 f"{machine['load_average_before']} before and {machine['load_average_after']} after; "
                 f"{report['seconds']:.1f} s")
    return "\n".join(lines)
