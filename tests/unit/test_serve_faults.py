"""Faults behind ``apportion serve``: a real HTTP backend on 127.0.0.1 that fails with 500s, hangs past
the timeout and cuts its JSON off (``bench.faults.server.FaultServer``, raw sockets), reached through
``OpenAIHTTPBackend`` with short timeouts. Every request completes or fails cleanly (OpenAI's error
format, within a bound, no traceback) and the key is charged exactly what the responses say they
spent. And a server killed (SIGKILL) mid-request: on restart its reservation is charged at its grant."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from apportion.bench.faults.server import FAULT_MODEL, FaultServer
from apportion.budget.units import Budget, Price
from apportion.cli import app as cli
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.serve import ServedApp
from apportion.serve.algorithm_app import ServeOptions, algorithm_app
from apportion.serve.keys import KeySpec, open_key_store
from apportion.serve.metrics import MetricsOptions, ServeMetrics, with_metrics
from apportion.serve.quota_contract import LazyQuotaStore
from apportion.serve.runner import bind_free_port

TIMEOUT_S = 0.4
BOUND_S = 10.0
"""The longest any request may take: a few calls, each at most its connect and reply timeouts,
retries of the 500s with a short backoff, and the load of a shared machine."""
SHARES = {"ok": 0.5, "500": 0.15, "hang": 0.1, "truncate": 0.15, "garbage": 0.1}
QUESTION = "What is 6 times 7?"


def request(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    kind = rng.choice(["plain", "sc-1", "sc-4", "best-of-n-3", "completions"])
    messages = [{"role": "user", "content": f"{QUESTION} ({i})"}]
    if kind == "plain":
        return "/v1/chat/completions", {"model": FAULT_MODEL, "messages": messages, "max_tokens": 24}
    if kind == "completions":
        return "/v1/completions", {"model": f"sc-2/{FAULT_MODEL}", "prompt": f"{QUESTION} ({i})", "max_tokens": 24}
    return "/v1/chat/completions", {"model": f"{kind}/{FAULT_MODEL}", "messages": messages, "max_tokens": 24,
                                    "seed": i}


def reported_spend(reply: httpx.Response) -> dict[str, Any]:
    """What a reply says it spent: a 200's ``apportion.spent``, an error body's where it ran."""
    return dict(reply.json().get("apportion", {}).get("spent") or {})


async def test_a_misbehaving_backend_gives_clean_answers_or_errors_and_the_key_is_charged_what_they_report(tmp_path):
    db = tmp_path / "keys.db"
    store = await open_key_store(db)
    try:
        await store.create_key(KeySpec("faults"))  # no quota: every request runs
        _, secret = await store.create_key(KeySpec("faulty"))
    finally:
        await store.aclose()
    price = Price.parse("1,2")
    quota = LazyQuotaStore(lambda: open_key_store(db))
    metrics = ServeMetrics(MetricsOptions(by_key=True))
    rng = random.Random(7)
    requests = [request(rng, i) for i in range(120)]
    timings: list[float] = []
    with FaultServer(SHARES, seed=3, hang_s=60) as upstream:
        backend = OpenAIHTTPBackend(HTTPOptions(base_url=upstream.base_url, model=FAULT_MODEL, price=price,
                                                timeout_s=TIMEOUT_S, connect_timeout_s=TIMEOUT_S, max_retries=2,
                                                backoff_s=0.01, max_backoff_s=0.05))
        app = algorithm_app(backend, ServeOptions(max_budget=Budget(generations=8, total_tokens=2000)), quota=quota,
                            observers=[metrics])
        try:
            with ServedApp(with_metrics(app, metrics)) as served:
                queue = list(requests)

                async def one_client(c: httpx.AsyncClient) -> list[httpx.Response]:
                    out = []
                    while queue:
                        path, payload = queue.pop()
                        started = time.monotonic()
                        out.append(await c.post(path, json=payload))
                        timings.append(time.monotonic() - started)
                    return out

                async with httpx.AsyncClient(base_url=served.url, timeout=BOUND_S * 2,
                                             headers={"Authorization": f"Bearer {secret}"}) as c:
                    replies = [r for rs in await asyncio.gather(*(one_client(c) for _ in range(16))) for r in rs]
        finally:
            await quota.aclose()
            await backend.aclose()
        billed = upstream.billing
    store = await open_key_store(db)
    try:
        usage = await store.usage("faulty")
    finally:
        await store.aclose()

    assert len(replies) == len(requests)
    assert max(timings) < BOUND_S, sorted(timings)[-5:]
    statuses = Counter(r.status_code for r in replies)
    assert statuses[200] >= 20 and sum(n for s, n in statuses.items() if s >= 500) >= 5, statuses
    for reply in replies:
        assert "Traceback" not in reply.text and reply.headers["x-request-id"]
        if reply.status_code != 200:
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], reply.text
            assert reply.status_code in (502, 503, 504), reply.text  # the backend's failure, never a 500 (a bug)
            assert error["type"] == "server_error" and error["code"] in ("backend_error", "backend_unavailable")
    spends = [reported_spend(r) for r in replies]
    assert all(s for s in spends), "every request ran: every reply says what it spent"
    for reply, spent in zip(replies, spends, strict=True):
        if reply.status_code == 200:
            assert reply.json()["usage"]["total_tokens"] == spent["total_tokens"]
    failed_spent = [s["total_tokens"] for r, s in zip(replies, spends, strict=True) if r.status_code != 200]
    assert any(failed_spent), "a hang or a cut-off reply is billed: some failures spent tokens"
    assert usage.spent.tokens == sum(s["total_tokens"] for s in spends)  # exact to the token
    assert float(usage.spent.usd) == sum(s["usd"] for s in spends) or \
        abs(float(usage.spent.usd) - sum(s["usd"] for s in spends)) < 1e-9
    assert usage.spent.requests == len(requests) and usage.open_reservations == 0
    # never under-charged: what the key paid covers every token the server generated (billed or not sent)
    assert usage.spent.tokens >= billed.prompt_tokens + billed.completion_tokens
    assert {"500", "hang", "truncate", "garbage"} <= set(billed.faults)


def _free_port() -> int:
    sock = bind_free_port()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


def _start_server(db: Path, backend_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "apportion", "serve", "--base-url", backend_url, "--model", FAULT_MODEL,
               "--db", str(db), "--replica", "killed", "--port", str(port), "--timeout", "60",
               "--max-budget", "gen=4,tokens=700", "--default-budget", "2"]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_health(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited: {log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server did not answer /health within 60 s: {log.read_text()}")


def _usage(db: Path) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["keys", "usage", "alice", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_a_server_killed_mid_request_charges_its_reservation_at_the_grant_on_restart(tmp_path):
    db, log = tmp_path / "keys.db", tmp_path / "server.log"
    made = CliRunner().invoke(cli, ["keys", "create", "alice", "--tokens-per-day", "5000", "--db", str(db), "--json"])
    assert made.exit_code == 0, made.output
    secret = json.loads(made.output)["secret"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with FaultServer({"hang": 1.0}, hang_s=120) as upstream:
        server = _start_server(db, upstream.base_url, port, log)
        try:
            _wait_for_health(url, server, log)
            outcome: list[BaseException | httpx.Response] = []

            def ask() -> None:
                try:
                    outcome.append(httpx.post(f"{url}/v1/chat/completions", timeout=90,
                                              headers={"Authorization": f"Bearer {secret}"},
                                              json={"model": f"sc-2/{FAULT_MODEL}",
                                                    "messages": [{"role": "user", "content": QUESTION}]}))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            client = threading.Thread(target=ask, daemon=True)
            client.start()
            deadline = time.monotonic() + 30
            while _usage(db)["open_reservations"] != 1:  # reserved, and waiting on the hanging backend
                assert time.monotonic() < deadline and client.is_alive(), f"never reserved: {outcome} {log.read_text()}"
                time.sleep(0.05)
            while upstream.billing.requests == 0:  # the run's call reached the backend
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
        client.join(30)
        assert outcome and isinstance(outcome[0], httpx.HTTPError), outcome  # no response came: it was killed
        before = _usage(db)
        assert before["open_reservations"] == 1 and before["spent"]["tokens"] == 0
        held = before["held"]["tokens"]
        assert held == 700  # the grant: the request's worst case, the server's maximum tokens per request

        restarted = _start_server(db, upstream.base_url, port, log)
        try:
            _wait_for_health(url, restarted, log)
            after = _usage(db)
            alive = httpx.get(f"{url}/metrics", timeout=5)
        finally:
            restarted.send_signal(signal.SIGTERM)
            restarted.wait(20)
    assert "charged 1 reservation(s)" in " ".join(log.read_text().split())
    assert after["open_reservations"] == 0
    assert after["spent"]["tokens"] == held and after["spent"]["requests"] == 1
    assert after["left"]["tokens"] == 5000 - held
    assert alive.status_code == 200 and "apportion_requests_total" in alive.text
