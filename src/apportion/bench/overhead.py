"""What the engine itself costs: apportion against an instant OpenAI-compatible server, next to the
same HTTP traffic sent by a bare client.

The server is ``openai_app`` over an ``InstantBackend`` (every request answered at once, n
honoured, every sample's text its own: ``mock_server.reply_text``) in a separate process
(``apportion.bench.mock_server``). For each cell of budgets (generations per question) x
concurrencies (questions in flight), over the same questions:
- apportion: self-consistency with ``Budget(generations=b)`` through ``OpenAIHTTPBackend``,
  the questions run by ``batch.answer_many`` with that concurrency;
- bare: the same requests (the JSON body apportion sends: same n, seed, messages) posted by a
  plain ``httpx.AsyncClient`` behind a semaphore of the same size, each reply decoded as JSON.
Both get fresh connection pools of the same size, warmed up before the clock starts. What is
left between the two is orchestration: budgeting, answer extraction, voting, result building,
and our client's parsing. The mock counts the requests it served, so extra calls by the engine
would show (self-consistency sends one n=b request per question: the counts must be equal).
Distinct reply texts matter: with every sample the same, a cache keyed by text would make
extraction look free. Each side keeps only counts of what it got (results and replies are dropped
as they arrive), and garbage is collected before each timed run, so neither pays for the other's.

Repeats are interleaved (every cell once, then again, alternating which side goes first) and
each figure is a median, because this machine's CPU time is stolen in bursts; each cell also
reports the client process's CPU time, which steal disturbs less than wall time. Orchestration is
reported per request and per generation, apportion minus bare, in wall and in CPU milliseconds,
and per budget (``summary.by_budget``: the median and the worst cell over concurrencies).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.batch import Item, answer_many
from apportion.bench.mock_server import MOCK_MODEL, REPLY_TOKENS, MockServer, reply_text

# the instant server's other names, importable from here as before the server had its own module
from apportion.bench.mock_server import REPLY_LOGPROB as REPLY_LOGPROB
from apportion.bench.mock_server import InstantBackend as InstantBackend
from apportion.bench.mock_server import mock_app as mock_app
from apportion.bench.mock_server import serve_mock as serve_mock
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend


@dataclass(frozen=True, slots=True)
class OverheadConfig:
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    concurrencies: tuple[int, ...] = (1, 4, 16, 64)
    questions: int = 64
    repeats: int = 3
    max_tokens: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("budgets", "concurrencies"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
        if self.questions < 1 or self.repeats < 1 or self.max_tokens < REPLY_TOKENS:
            raise ConfigError(f"questions >= 1, repeats >= 1 and max_tokens >= {REPLY_TOKENS} are required")


# -- one timed run -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SideRun:
    """One side of one cell, once: wall and CPU seconds, what the mock served, what the client got."""

    wall_s: float
    cpu_s: float
    requests: int
    served_samples: int
    generations: int
    output_tokens: int
    client_calls: int


@dataclass(frozen=True, slots=True)
class _Cell:
    budget: int
    concurrency: int


def _questions(config: OverheadConfig) -> list[str]:
    return [f"Tom has {i} apples and buys {42 - i % 42} more, then gives {i % 42} away. How many are left?"
            for i in range(config.questions)]


def _sampling(config: OverheadConfig) -> SamplingOptions:
    return SamplingOptions(max_tokens=config.max_tokens)


def _chat_messages(question: str, sampling: SamplingOptions) -> list[dict[str, str]]:
    system = [{"role": "system", "content": sampling.system_prompt}] if sampling.system_prompt else []
    return [*system, {"role": "user", "content": question}]


def bare_body(question: str, n: int, seed: int, sampling: SamplingOptions) -> dict[str, Any]:
    """The body our HTTP client sends for self-consistency's one call on ``question``."""
    return {"model": MOCK_MODEL, "max_tokens": sampling.max_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "n": n, "stream": False, "seed": seed,
            "messages": _chat_messages(question, sampling), "logprobs": True, "top_logprobs": 1}


async def _stats(stats_client: httpx.AsyncClient) -> dict[str, int]:
    response = await stats_client.get("/mock/stats")
    response.raise_for_status()
    return dict(response.json())


async def _timed(stats_client: httpx.AsyncClient,
                 work: Callable[[], Awaitable[tuple[int, int, int]]]) -> SideRun:
    before = await _stats(stats_client)
    gc.collect()  # the garbage of whatever ran before is not this run's to collect
    wall, cpu = time.perf_counter(), time.process_time()
    generations, output_tokens, calls = await work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = await _stats(stats_client)
    return SideRun(wall, cpu, after["requests"] - before["requests"], after["samples"] - before["samples"],
                   generations, output_tokens, calls)


async def _apportion_side(base_url: str, stats_client: httpx.AsyncClient, cell: _Cell,
                          config: OverheadConfig) -> SideRun:
    sampling = _sampling(config)
    backend = OpenAIHTTPBackend(HTTPOptions(base_url=base_url, model=MOCK_MODEL, max_concurrency=cell.concurrency))
    items = [Item(line, line, q) for line, q in enumerate(_questions(config), start=1)]

    async def work() -> tuple[int, int, int]:
        # Each result is counted as it arrives and dropped, as the bare side drops each reply.
        generations = output_tokens = calls = 0
        failed: list[str | None] = []
        async for o in answer_many(lambda: make_algorithm("self-consistency", sampling), backend, items,
                                   Budget(generations=cell.budget), concurrency=cell.concurrency, seed=config.seed):
            if o.result is None:
                failed.append(o.error)
                continue
            spent = o.result.spent
            generations, output_tokens, calls = (generations + spent.generations,
                                                 output_tokens + spent.output_tokens, calls + spent.calls)
        if failed:
            raise RuntimeError(f"{len(failed)} question(s) failed, first: {failed[0]}")
        return generations, output_tokens, calls

    try:
        warm = Prompt.chat("warm-up", system=sampling.system_prompt)
        await asyncio.gather(*(backend.generate(warm, SamplingParams(n=2, max_tokens=8))
                               for _ in range(cell.concurrency)))
        return await _timed(stats_client, work)
    finally:
        await backend.aclose()


async def _bare_side(base_url: str, stats_client: httpx.AsyncClient, cell: _Cell,
                     config: OverheadConfig) -> SideRun:
    sampling = _sampling(config)
    bodies = [bare_body(q, cell.budget, config.seed + line, sampling)
              for line, q in enumerate(_questions(config), start=1)]
    limits = httpx.Limits(max_connections=cell.concurrency, max_keepalive_connections=cell.concurrency)
    url = f"{base_url}/chat/completions"
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300, connect=10)) as client:
        gate = asyncio.Semaphore(cell.concurrency)

        async def one(body: dict[str, Any]) -> tuple[int, int]:
            async with gate:
                response = await client.post(url, json=body)
            response.raise_for_status()
            data = response.json()
            return len(data["choices"]), int(data["usage"]["completion_tokens"])

        async def work() -> tuple[int, int, int]:
            replies = await asyncio.gather(*(one(b) for b in bodies))
            return sum(r[0] for r in replies), sum(r[1] for r in replies), len(replies)

        warm = bare_body("warm-up", 2, 0, sampling)
        await asyncio.gather(*(one(warm) for _ in range(cell.concurrency)))
        return await _timed(stats_client, work)


# -- the grid ------------------------------------------------------------------------------------


async def check_honours_n(base_url: str, stats_client: httpx.AsyncClient, n: int = 3) -> bool:
    """One request of n through our client: n samples back, one request at the server, no notes
    (our client notes, and works around, a server that ignores n)."""
    backend = OpenAIHTTPBackend(HTTPOptions(base_url=base_url, model=MOCK_MODEL))
    try:
        before = await _stats(stats_client)
        completion = await backend.generate(Prompt.chat("n check"), SamplingParams(n=n, max_tokens=8))
        after = await _stats(stats_client)
    finally:
        await backend.aclose()
    return (len(completion.samples) == n and not completion.notes and backend.capabilities.native_n
            and after["requests"] - before["requests"] == 1 and after["samples"] - before["samples"] == n)


async def measure(config: OverheadConfig, server_url: str) -> dict[str, Any]:
    """The grid against an instant server already running at ``server_url`` (no /v1)."""
    base_url = f"{server_url}/v1"
    cells = [_Cell(b, c) for b in config.budgets for c in config.concurrencies]
    runs: dict[_Cell, list[tuple[SideRun, SideRun]]] = {cell: [] for cell in cells}
    load_before = os.getloadavg()  # other work on the machine shows here, and in the figures
    async with httpx.AsyncClient(base_url=server_url, timeout=30) as stats_client:
        honours_n = await check_honours_n(base_url, stats_client)
        if not honours_n:
            raise RuntimeError("the instant server does not honour n: the bare baseline would not be comparable")
        for repeat in range(config.repeats):
            for index, cell in enumerate(cells):
                runs[cell].append(await _pair(base_url, stats_client, cell, config, (repeat + index) % 2 == 0))
    rows = [_cell_row(cell, pairs, config) for cell, pairs in runs.items()]
    summary = {**_summary(rows, honours_n), "load_average_before": load_before, "load_average_after": os.getloadavg()}
    return {"config": _config_dict(config), "cells": rows, "summary": summary}


async def _pair(base_url: str, stats_client: httpx.AsyncClient, cell: _Cell, config: OverheadConfig,
                apportion_first: bool) -> tuple[SideRun, SideRun]:
    """Both sides of a cell, back to back, in the given order (alternated across the grid)."""
    if apportion_first:
        ours = await _apportion_side(base_url, stats_client, cell, config)
        bare = await _bare_side(base_url, stats_client, cell, config)
    else:
        bare = await _bare_side(base_url, stats_client, cell, config)
        ours = await _apportion_side(base_url, stats_client, cell, config)
    return ours, bare


def run(config: OverheadConfig | None = None) -> dict[str, Any]:
    """Start the instant server in its own process, measure the grid, stop the server."""
    config = config or OverheadConfig()
    with MockServer() as server:
        return asyncio.run(measure(config, server.url))


def _cell_row(cell: _Cell, pairs: list[tuple[SideRun, SideRun]], config: OverheadConfig) -> dict[str, Any]:
    ours, bare = [p[0] for p in pairs], [p[1] for p in pairs]
    generations = config.questions * cell.budget
    requests = max(r.requests for r in ours)
    difference = statistics.median(o.wall_s - b.wall_s for o, b in pairs)
    cpu_difference = statistics.median(o.cpu_s - b.cpu_s for o, b in pairs)
    expected_tokens = generations * REPLY_TOKENS
    checks = {
        "generations": all(r.generations == generations == r.served_samples for r in ours + bare),
        "output_tokens": all(r.output_tokens == expected_tokens for r in ours + bare),
        "requests_equal": all(o.requests == b.requests == config.questions for o, b in pairs),
        "client_calls_match_server": all(r.client_calls == r.requests for r in ours + bare),
    }
    return {
        "budget": cell.budget,
        "concurrency": cell.concurrency,
        "questions": config.questions,
        "generations": generations,
        "apportion_s": statistics.median(r.wall_s for r in ours),
        "bare_s": statistics.median(r.wall_s for r in bare),
        "ratio": statistics.median(o.wall_s / b.wall_s for o, b in pairs),
        "orchestration_ms_per_generation": difference / generations * 1000,
        "orchestration_ms_per_request": difference / requests * 1000,
        "orchestration_cpu_ms_per_request": cpu_difference / requests * 1000,
        "apportion_cpu_s": statistics.median(r.cpu_s for r in ours),
        "bare_cpu_s": statistics.median(r.cpu_s for r in bare),
        "apportion_cpu_ms_per_request": statistics.median(r.cpu_s for r in ours) / requests * 1000,
        "bare_cpu_ms_per_request": statistics.median(r.cpu_s for r in bare) / requests * 1000,
        "apportion_requests": requests,
        "bare_requests": max(r.requests for r in bare),
        "apportion_generations": max(r.generations for r in ours),
        "bare_generations": max(r.generations for r in bare),
        "apportion_output_tokens": max(r.output_tokens for r in ours),
        "bare_output_tokens": max(r.output_tokens for r in bare),
        "checks": checks,
        "repeats": [{"apportion": asdict(o), "bare": asdict(b)} for o, b in pairs],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summary(rows: list[dict[str, Any]], honours_n: bool) -> dict[str, Any]:
    return {
        "mock_honours_n": honours_n,
        "checks_passed": all(all(r["checks"].values()) for r in rows),
        "ratio": _spread([r["ratio"] for r in rows]),
        "orchestration_ms_per_generation": _spread([r["orchestration_ms_per_generation"] for r in rows]),
        "orchestration_ms_per_request": _spread([r["orchestration_ms_per_request"] for r in rows]),
        "orchestration_cpu_ms_per_request": _spread([r["orchestration_cpu_ms_per_request"] for r in rows]),
        "apportion_cpu_over_bare_cpu": _spread([r["apportion_cpu_s"] / r["bare_cpu_s"] for r in rows]),
        "by_budget": _by_budget(rows),
    }


def _by_budget(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per budget, over its concurrencies: orchestration per request (wall and CPU, apportion
    minus bare) as median and worst cell, and the wall-time ratio."""
    out: dict[str, dict[str, Any]] = {}
    for budget in sorted({r["budget"] for r in rows}):
        cells = [r for r in rows if r["budget"] == budget]
        out[str(budget)] = {
            "orchestration_ms_per_request": _spread([r["orchestration_ms_per_request"] for r in cells]),
            "orchestration_cpu_ms_per_request": _spread([r["orchestration_cpu_ms_per_request"] for r in cells]),
            "ratio": _spread([r["ratio"] for r in cells]),
        }
    return out


def _config_dict(config: OverheadConfig) -> dict[str, Any]:
    installed = {m: importlib.util.find_spec(m) is not None for m in ("uvloop", "httptools")}
    return {
        **asdict(config),
        "algorithm": "self-consistency",
        "reply": "distinct per sample (mock_server.reply_text of the request's seed and the sample's index), "
                 f"e.g. {reply_text(1, 0)!r}",
        "reply_tokens": REPLY_TOKENS,
        "server": "openai_app(InstantBackend) under uvicorn in a separate process (subprocess), "
                  "loop=auto http=auto, access log off",
        "server_fast_paths_installed": installed,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def table(report: dict[str, Any]) -> str:
    """The cells as a Markdown table, for a terminal or a results file."""
    head = ("| budget | conc | gens | reqs (ours/bare) | apportion s | bare s | ratio | ms/gen | ms/req "
            "| cpu ms/req | cpu s (ours/bare) | checks |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in report["cells"]:
        ok = "ok" if all(r["checks"].values()) else ",".join(k for k, v in r["checks"].items() if not v)
        lines.append(
            f"| {r['budget']} | {r['concurrency']} | {r['generations']} | {r['apportion_requests']}/"
            f"{r['bare_requests']} | {r['apportion_s']:.3f} | {r['bare_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['orchestration_ms_per_generation']:.3f} | {r['orchestration_ms_per_request']:.2f} | "
            f"{r['orchestration_cpu_ms_per_request']:.2f} | {r['apportion_cpu_s']:.3f}/{r['bare_cpu_s']:.3f} | {ok} |")
    return "\n".join(lines)
