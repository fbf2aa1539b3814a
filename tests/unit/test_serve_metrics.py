"""``/metrics``: Prometheus's text format (read back with prometheus_client's own parser), fed by the
server's request observer; counts per route, algorithm and status, spend per algorithm and key,
latency histograms, runs in flight; one registry per app; ``apportion serve`` serves it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from fractions import Fraction
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp
from typer.testing import CliRunner

import apportion.serve
from apportion.budget.units import Budget, Price, Spend
from apportion.cli import app as cli
from apportion.errors import ConfigError
from apportion.lm.base import Completion, Prompt, SamplingParams
from apportion.lm.scripted import ScriptedBackend
from apportion.serve import ServedApp, openai_app
from apportion.serve.algorithm_app import algorithm_app
from apportion.serve.hooks import RequestFinished, RequestStarted
from apportion.serve.keys import KeySpec, open_key_store
from apportion.serve.metrics import PLAIN, MetricsOptions, ServeMetrics, with_metrics

MODEL = "m"
QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]
SC = "self-consistency"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by name and labels (the parser raises on malformed text)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def backend(**kw: Any) -> ScriptedBackend:
    return ScriptedBackend(["Adding them. The answer is 7."], model=MODEL, **kw)


def metered(lm: Any, metrics: ServeMetrics, **kw: Any) -> ASGIApp:
    return with_metrics(algorithm_app(lm, observers=[metrics], **kw), metrics)


@asynccontextmanager
async def client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def scrape(c: httpx.AsyncClient) -> Samples:
    response = await c.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


async def test_requests_spend_and_latency_are_counted_per_algorithm():
    metrics = ServeMetrics()
    price = Price.parse("1,2")  # dollars per million input and output tokens
    async with client(metered(backend(price=price), metrics)) as c:
        sc = [await c.post("/v1/chat/completions", json={"model": f"sc-3/{MODEL}", "messages": QUESTION})
              for _ in range(2)]
        plain = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
        completion = await c.post("/v1/completions", json={"model": f"sc-2/{MODEL}", "prompt": "3 + 4 ="})
        unknown = await c.post("/v1/chat/completions", json={"model": f"vibes-3/{MODEL}", "messages": QUESTION})
        over = await c.post("/v1/chat/completions", json={"model": f"sc-500/{MODEL}", "messages": QUESTION})
        assert [r.status_code for r in (*sc, plain, completion, unknown, over)] == [200, 200, 200, 200, 400, 400]
        samples = await scrape(c)
        health = await c.get("/health")
    assert health.json()["status"] == "ok"

    requests = "apportion_requests_total"
    assert value(samples, requests, route="chat", algorithm=SC, status="200", outcome="ok") == 2
    assert value(samples, requests, route="chat", algorithm=PLAIN, status="200", outcome="ok") == 1
    assert value(samples, requests, route="completions", algorithm=SC, status="200", outcome="ok") == 1
    assert value(samples, requests, route="chat", algorithm="", status="400", outcome="refused") == 1
    assert value(samples, requests, route="chat", algorithm=SC, status="400", outcome="refused") == 1
    assert sum(v for (name, _), v in samples.items() if name == requests) == 6

    runs = [r.json() for r in (*sc, completion)]
    spent_input = sum(r["usage"]["prompt_tokens"] for r in runs)
    spent_output = sum(r["usage"]["completion_tokens"] for r in runs)
    assert spent_input and spent_output
    assert value(samples, "apportion_input_tokens_total", algorithm=SC) == spent_input
    assert value(samples, "apportion_output_tokens_total", algorithm=SC) == spent_output
    assert value(samples, "apportion_generations_total", algorithm=SC) == 3 + 3 + 2
    assert value(samples, "apportion_input_tokens_total", algorithm=PLAIN) == plain.json()["usage"]["prompt_tokens"]
    usd = sum(r["apportion"]["spent"]["usd"] for r in runs)
    assert usd > 0 and value(samples, "apportion_spent_usd_total", algorithm=SC) == pytest.approx(usd)
    assert usd == pytest.approx((spent_input * 1 + spent_output * 2) / 1e6)

    histogram = "apportion_request_duration_seconds"
    assert value(samples, f"{histogram}_count", algorithm=SC, outcome="ok") == 3
    assert value(samples, f"{histogram}_bucket", algorithm=SC, outcome="ok", le="+Inf") == 3
    assert 0 < value(samples, f"{histogram}_sum", algorithm=SC, outcome="ok") < 30
    assert value(samples, f"{histogram}_count", algorithm="", outcome="refused") == 1
    assert value(samples, "apportion_runs_in_flight", algorithm=SC) == 0
    assert any(name.startswith("process_") for name, _ in samples)  # Linux's /proc, as this test runs on


async def test_with_keys_spend_is_labelled_by_key_id_and_refusals_make_no_spend_series(tmp_path):
    store = await open_key_store(tmp_path / "keys.db")
    try:
        alice, alice_secret = await store.create_key(KeySpec("alice"))
        bob, bob_secret = await store.create_key(KeySpec("bob", tokens=1))  # spent by nothing: its first is a 429
        metrics = ServeMetrics(MetricsOptions(by_key=True))
        async with client(metered(backend(), metrics, quota=store)) as c:
            body = {"model": f"sc-2/{MODEL}", "messages": QUESTION}
            ok = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {alice_secret}"})
            small = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {bob_secret}"})
            anonymous = await c.post("/v1/chat/completions", json=body)
            samples = await scrape(c)
    finally:
        await store.aclose()
    assert (ok.status_code, small.status_code, anonymous.status_code) == (200, 429, 401)
    assert value(samples, "apportion_input_tokens_total", algorithm=SC, key=alice.key_id) == \
        ok.json()["usage"]["prompt_tokens"]
    assert value(samples, "apportion_output_tokens_total", algorithm=SC, key=alice.key_id) == \
        ok.json()["usage"]["completion_tokens"]
    assert value(samples, "apportion_requests_total", route="chat", algorithm="", status="401", outcome="refused") == 1
    assert value(samples, "apportion_requests_total", route="chat", algorithm=SC, status="429", outcome="refused") == 1
    spend_keys = {dict(labels).get("key") for name, labels in samples if name == "apportion_input_tokens_total"}
    assert spend_keys == {alice.key_id}  # bob's refusal spent nothing, the anonymous one had no key
    assert bob.key_id not in str(samples) and alice_secret not in str(samples)


class GatedBackend(ScriptedBackend):
    """Holds every call until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(["The answer is 7."], model=MODEL)
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def generate(self, prompt: Prompt, params: SamplingParams, *, deadline: float | None = None) -> Completion:
        self.entered.set()
        await self.gate.wait()
        return await super().generate(prompt, params, deadline=deadline)


async def test_runs_in_flight_are_counted_until_they_finish():
    metrics, lm = ServeMetrics(), GatedBackend()
    async with client(metered(lm, metrics)) as c:
        running = asyncio.create_task(c.post("/v1/chat/completions",
                                             json={"model": f"sc-2/{MODEL}", "messages": QUESTION}))
        await asyncio.wait_for(lm.entered.wait(), 10)
        during = await scrape(c)
        lm.gate.set()
        assert (await running).status_code == 200
        after = await scrape(c)
    assert value(during, "apportion_runs_in_flight", algorithm=SC) == 1
    assert value(during, "apportion_requests_total", route="chat", algorithm=SC, status="200", outcome="ok") == 0
    assert value(after, "apportion_runs_in_flight", algorithm=SC) == 0
    assert value(after, "apportion_requests_total", route="chat", algorithm=SC, status="200", outcome="ok") == 1


def _finished(request_id: str, *, algorithm: str | None = SC, status: int = 200, outcome: str = "ok",
              spent: Spend | None = None, key: str | None = None) -> RequestFinished:
    return RequestFinished(request_id, "chat", algorithm, key, False, status, outcome, 0.02, spent or Spend(),
                           Budget(generations=2))


def test_each_instance_has_its_own_registry_and_an_unstarted_finish_leaves_the_gauge_alone():
    one, two = ServeMetrics(MetricsOptions(process=False)), ServeMetrics(MetricsOptions(process=False))
    one.request_started(RequestStarted("a", "chat", SC, Budget(generations=2), None, False))
    one.request_finished(_finished("a", spent=Spend(generations=2, input_tokens=10, output_tokens=4,
                                                    usd=Fraction(3, 10**6))))
    one.request_finished(_finished("never-started", status=400, outcome="refused"))
    first, second = parse(one.render().decode()), parse(two.render().decode())
    assert value(first, "apportion_requests_total", route="chat", algorithm=SC, status="200", outcome="ok") == 1
    assert value(first, "apportion_runs_in_flight", algorithm=SC) == 0  # not -1
    assert value(first, "apportion_spent_usd_total", algorithm=SC) == pytest.approx(3e-6)
    assert not any(name.startswith("apportion_requests") for name, _ in second)  # nothing leaked across
    assert not any(name.startswith("process_") for name, _ in first)


def test_a_namespace_renames_every_family_and_bad_options_are_refused():
    metrics = ServeMetrics(MetricsOptions(namespace="edge", process=False, latency_buckets=(0.1, 1.0)))
    metrics.request_finished(_finished("a"))
    samples = parse(metrics.render().decode())
    assert value(samples, "edge_requests_total", route="chat", algorithm=SC, status="200", outcome="ok") == 1
    assert value(samples, "edge_request_duration_seconds_bucket", algorithm=SC, outcome="ok", le="0.1") == 1
    assert all(name.startswith("edge_") for name, _ in samples)
    for bad in ({"namespace": "9x"}, {"namespace": "a-b"}, {"latency_buckets": ()}, {"latency_buckets": (1.0, 0.5)},
                {"latency_buckets": (0.0, 1.0)}, {"path": "metrics"}, {"path": "/"}):
        with pytest.raises(ConfigError):
            MetricsOptions(**bad)


def test_apportion_serve_serves_metrics(monkeypatch):
    with ServedApp(openai_app(ScriptedBackend(["The answer is 7."], model="up"))) as upstream:
        started: list[Any] = []
        monkeypatch.setattr(apportion.serve, "serve",
                            lambda a, *, host, port, log_level: started.append(a))
        result = CliRunner().invoke(cli, ["serve", "--base-url", upstream.base_url, "--model", "up"])
        assert result.exit_code == 0, result.output
        [served] = started

        async def ask() -> tuple[httpx.Response, Samples]:
            async with client(served) as c:
                ok = await c.post("/v1/chat/completions", json={"model": "sc-2/up", "messages": QUESTION})
                return ok, await scrape(c)

        ok, samples = asyncio.run(ask())
    assert ok.status_code == 200
    assert value(samples, "apportion_requests_total", route="chat", algorithm=SC, status="200", outcome="ok") == 1
    assert value(samples, "apportion_generations_total", algorithm=SC) == 2
