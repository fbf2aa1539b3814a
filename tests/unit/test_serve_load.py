"""Load: many concurrent clients against ``apportion serve``'s app under uvicorn on 127.0.0.1, over an
instant backend. Every request is answered, and with a real SQLite key store the quota is exact to the
token under concurrency: what the 200s report is what the key was charged, never more than its quota,
and 429s once it is spent. (Requests per second and the latency added are ``apportion bench
serve-load``'s to measure, not a test's to assert on a shared machine.)"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apportion.bench.mock_server import MOCK_MODEL, REPLY_TOKENS, InstantBackend
from apportion.budget.units import Budget
from apportion.serve import ServedApp
from apportion.serve.algorithm_app import ServeOptions, algorithm_app
from apportion.serve.keys import KeySpec, open_key_store
from apportion.serve.metrics import MetricsOptions, ServeMetrics, with_metrics
from apportion.serve.quota_contract import LazyQuotaStore

CLIENTS = 64
REQUESTS = 500
MAX_TOKENS = 16


def body(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    """A mix of what clients send: algorithms by prefix and by object, plain calls, both routes."""
    question = [{"role": "user", "content": f"Question {i}: what is {i} + {rng.randint(1, 99)}?"}]
    kind = rng.choice(["sc-4", "sc-1", "plain", "object", "completions"])
    if kind == "plain":
        return "/v1/chat/completions", {"model": MOCK_MODEL, "messages": question, "max_tokens": MAX_TOKENS}
    if kind == "object":
        return "/v1/chat/completions", {"model": MOCK_MODEL, "messages": question, "max_tokens": MAX_TOKENS,
                                        "seed": i, "apportion": {"algorithm": "sc", "budget": {"gen": 3}}}
    if kind == "completions":
        return "/v1/completions", {"model": f"sc-2/{MOCK_MODEL}", "prompt": f"{i} + 1 =", "max_tokens": MAX_TOKENS}
    return "/v1/chat/completions", {"model": f"{kind}/{MOCK_MODEL}", "messages": question, "max_tokens": MAX_TOKENS,
                                    "seed": i}


async def hammer(base: str, requests: list[tuple[str, dict[str, Any]]], headers: dict[str, str] | None = None,
                 ) -> list[httpx.Response]:
    """``CLIENTS`` clients, each on its own connection, taking the next request as soon as one is answered;
    the replies in the order they came."""
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    replies: list[httpx.Response] = []

    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as c:
            while not queue.empty():
                path, payload = queue.get_nowait()
                replies.append(await c.post(path, json=payload))

    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(CLIENTS))), 240)
    assert len(replies) == len(requests)
    return replies


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          where: Callable[[dict[str, str]], bool] = lambda labels: True) -> float:
    return sum(v for (n, labels), v in found.items() if n == name and where(dict(labels)))


async def test_every_request_of_many_concurrent_clients_is_answered():
    backend, metrics = InstantBackend(), ServeMetrics()
    rng = random.Random(12)
    requests = [body(rng, i) for i in range(REQUESTS)]
    with ServedApp(with_metrics(algorithm_app(backend, observers=[metrics]), metrics)) as served:
        replies = await hammer(served.url, requests)
        async with httpx.AsyncClient(base_url=served.url) as c:
            found = samples((await c.get("/metrics")).text)
    assert Counter(r.status_code for r in replies) == {200: REQUESTS}, [r.text for r in replies if r.status_code != 200]
    assert len({r.headers["x-request-id"] for r in replies}) == REQUESTS
    for reply in replies:
        payload, answer = json.loads(reply.request.content), reply.json()
        expected = 4 if payload["model"].startswith("sc-4") else 3 if "apportion" in payload else \
            2 if payload["model"].startswith("sc-2") else 1
        assert answer["apportion"]["spent"]["generations"] == expected
        assert answer["usage"]["completion_tokens"] == expected * REPLY_TOKENS
        usage = answer["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the instant backend answers n samples per call: each request was one call, no retry or duplicate
    assert backend.requests == REQUESTS
    assert total(found, "apportion_requests_total") == REQUESTS
    assert total(found, "apportion_requests_total", lambda labels: labels["status"] == "200") == REQUESTS
    assert total(found, "apportion_output_tokens_total") == sum(r.json()["usage"]["completion_tokens"] for r in replies)
    assert total(found, "apportion_runs_in_flight") == 0
    assert total(found, "apportion_request_duration_seconds_count") == REQUESTS


@pytest.mark.parametrize("quota", [8_000, 9_001])
async def test_a_keys_quota_is_exact_to_the_token_under_concurrency(tmp_path, quota):
    """500 requests from 64 clients at once spend a quota that pays for about three in five of them. A 429
    under load may only mean that requests in flight hold what is left (each reserves its worst case
    until it settles), so the quota is then asked for the cheapest request (2 tokens), one at a time,
    until it refuses with nothing in flight: spent, down to less than that."""
    db = tmp_path / "keys.db"
    store = await open_key_store(db)
    try:
        key, secret = await store.create_key(KeySpec("load", tokens=quota))
    finally:
        await store.aclose()
    # Each request reserves at most 120 tokens (the server's maximum), so many hold reservations at once.
    options = ServeOptions(max_budget=Budget(generations=8, total_tokens=120))
    quota_store = LazyQuotaStore(lambda: open_key_store(db))
    metrics = ServeMetrics(MetricsOptions(by_key=True))
    rng = random.Random(quota)
    auth = {"Authorization": f"Bearer {secret}"}
    try:
        with ServedApp(with_metrics(algorithm_app(InstantBackend(), options, quota=quota_store, observers=[metrics]),
                                    metrics)) as served:
            replies = await hammer(served.url, [body(rng, i) for i in range(REQUESTS)], auth)
            under_load = Counter(r.status_code for r in replies)
            async with httpx.AsyncClient(base_url=served.url, headers=auth, timeout=60) as c:
                for _ in range(quota):  # the cheapest request there is: a 1-token prompt, 1 token out
                    replies.append(await c.post("/v1/completions", json={"model": MOCK_MODEL, "prompt": "1",
                                                                         "max_tokens": 1}))
                    if replies[-1].status_code == 429:
                        break
                found = samples((await c.get("/metrics")).text)
    finally:
        await quota_store.aclose()
    store = await open_key_store(db)
    try:
        usage = await store.usage("load")
    finally:
        await store.aclose()

    assert set(under_load) <= {200, 429} and under_load[200] >= 100 and under_load[429] >= 1, under_load
    assert replies[-1].status_code == 429, "the quota was never spent"
    ok = [r.json() for r in replies if r.status_code == 200]
    refused = [r.json() for r in replies if r.status_code == 429]
    assert all(e["error"]["type"] == "insufficient_quota" for e in refused)
    assert {e["error"]["code"] for e in refused} <= {"tokens_quota_exceeded", "quota_too_small"}
    reported = sum(a["usage"]["total_tokens"] for a in ok) + \
        sum(e.get("apportion", {}).get("spent", {}).get("total_tokens", 0) for e in refused)
    assert usage.spent.tokens == reported  # exact to the token
    assert usage.spent.tokens <= quota
    assert usage.open_reservations == 0 and usage.held.tokens == 0
    # every admitted request is counted once: the 200s, and the 429s of a grant too small to run
    assert usage.spent.requests == len(ok) + sum(e["error"]["code"] == "quota_too_small" for e in refused)
    assert usage.tokens_left is not None and usage.tokens_left < 2  # spent down to the token
    assert total(found, "apportion_input_tokens_total", lambda labels: labels["key"] == key.key_id) + \
        total(found, "apportion_output_tokens_total", lambda labels: labels["key"] == key.key_id) == reported


def test_the_serve_load_benchmark_runs_every_row_and_checks_itself(tmp_path):
    """`apportion bench serve-load`, as small as it goes: every row answered, every keyed request charged."""
    from typer.testing import CliRunner

    from apportion.cli import app as cli

    out = tmp_path / "serve_load.json"
    result = CliRunner().invoke(cli, ["bench", "serve-load", "--requests", "6", "--concurrency", "3",
                                      "--sequential", "2", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["checks"] == {"no_errors": True, "every_keyed_request_charged": True}
    assert report["keyed_requests_charged"] == 3 * (6 + 3 + 2)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"direct n=1", "direct n=8", "plain", "sc-1", "sc-8", "plain + keys", "sc-1 + keys",
                         "sc-8 + keys"}
    assert rows["sc-8"]["baseline"] == "direct n=8" and rows["plain + keys"]["baseline"] == "direct n=1"
    assert all(r["rps"] > 0 and r["sequential_ms"]["p50"] > 0 for r in rows.values())
    assert "| sc-8 + keys | direct n=8 |" in result.output
