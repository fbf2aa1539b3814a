"""The dashboard's request log and JSON endpoints, over ``algorithm_app`` and a scripted backend
through httpx's ASGI transport: what it shows of requests (in flight, recent, in bounded memory),
spend per key and per algorithm, benchmark runs and their plots, and who may look."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from fractions import Fraction
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from starlette.applications import Starlette
from typer.testing import CliRunner

import apportion.serve
from apportion.budget.units import Budget, Price, Spend
from apportion.cli import app as app_cli
from apportion.errors import ConfigError
from apportion.lm.base import Completion, Prompt, SamplingParams
from apportion.lm.scripted import ScriptedBackend
from apportion.serve import ServedApp, openai_app
from apportion.serve.algorithm_app import algorithm_app
from apportion.serve.dashboard import COOKIE, Dashboard, DashboardOptions, RequestLog, with_dashboard
from apportion.serve.hooks import RequestFinished, RequestStarted
from apportion.serve.keys import KeySpec, KeyStore, open_key_store

FIXTURE_RUN = Path(__file__).resolve().parent.parent / "fixtures" / "report_run"
QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]
TOKEN = "a-dashboard-token"
PRICE = Price(input_per_mtok=2.0, output_per_mtok=8.0)
API = ("/dashboard/api/requests", "/dashboard/api/spend", "/dashboard/api/runs")
PAGES = ("/", "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css", *API)


def backend() -> ScriptedBackend:
    return ScriptedBackend(["Adding them. The answer is 7."], model="m", price=PRICE)


def app(board: Dashboard, *, lm: ScriptedBackend | None = None, quota: KeyStore | None = None) -> Starlette:
    served = algorithm_app(lm or backend(), quota=quota, observers=[board.log])
    return with_dashboard(served, board, keys=quota is not None)


@asynccontextmanager
async def client(asgi: Starlette, host: str = "127.0.0.1", **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=asgi, client=(host, 50_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", **kw) as c:
        yield c


def chat(algorithm: str | None = None, budget: int = 2, **kw: Any) -> dict[str, Any]:
    extra = {"apportion": {"algorithm": algorithm, "budget": budget}} if algorithm else {}
    return {"model": "m", "messages": QUESTION, **extra, **kw}


async def get_json(c: httpx.AsyncClient, path: str, **kw: Any) -> dict[str, Any]:
    response = await c.get(path, **kw)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return dict(response.json())


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]


@pytest.fixture
async def keys(tmp_path: Path) -> AsyncIterator[tuple[KeyStore, dict[str, str], dict[str, str]]]:
    """A real SQLite key store with two keys: the store, their secrets and their ids by name."""
    store = await open_key_store(tmp_path / "keys.db")
    secrets, ids = {}, {}
    for name in ("alice", "bob"):
        record, secret = await store.create_key(KeySpec(name))
        secrets[name], ids[name] = secret, record.key_id
    try:
        yield store, secrets, ids
    finally:
        await store.aclose()


# -- requests and spend ----------------------------------------------------------------------------


async def test_finished_requests_show_what_they_spent_newest_first():
    board = Dashboard()
    async with client(app(board)) as c:
        sc = await c.post("/v1/chat/completions", json=chat("self-consistency", 3))
        bon = await c.post("/v1/chat/completions", json=chat("best-of-n", 2))
        plain = await c.post("/v1/chat/completions", json=chat())
        refused = await c.post("/v1/chat/completions", json=chat("no-such-algorithm"))
        assert [r.status_code for r in (sc, bon, plain, refused)] == [200, 200, 200, 400]
        shown = await get_json(c, "/dashboard/api/requests")

    assert shown["in_flight"] == [] and shown["finished_total"] == 4 and shown["capacity"] == 100
    recent = shown["recent"]
    assert [r["algorithm"] for r in recent] == [None, None, "best-of-n", "self-consistency"]
    assert [(r["status"], r["outcome"]) for r in recent] == [(400, "refused"), (200, "ok"), (200, "ok"), (200, "ok")]
    for row, answer in zip(recent[1:], (plain, bon, sc)):
        body = answer.json()
        assert row["request_id"] == answer.headers["x-request-id"]
        assert row["spent"]["total_tokens"] == body["usage"]["total_tokens"] > 0
        assert row["spent"]["usd"] == pytest.approx(body["apportion"]["spent"]["usd"]) and row["spent"]["usd"] > 0
        assert row["budget"] == body["apportion"]["budget"]
        assert row["latency_s"] >= 0 and row["finished_at"].endswith("Z") and row["error"] is None
    assert recent[3]["spent"]["generations"] == 3
    assert "no-such-algorithm" in recent[0]["error"] and recent[0]["spent"]["total_tokens"] == 0


async def test_spend_per_key_and_per_algorithm_adds_up(keys):
    store, secrets, ids = keys
    board = Dashboard()
    usage: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    async with client(app(board, quota=store)) as c:
        for name, algorithm, budget in (("alice", "self-consistency", 3), ("alice", "best-of-n", 2),
                                        ("bob", "self-consistency", 2), ("bob", None, 1)):
            answer = await c.post("/v1/chat/completions", json=chat(algorithm, budget),
                                  headers={"Authorization": f"Bearer {secrets[name]}"})
            assert answer.status_code == 200, answer.text
            usage.setdefault((name, algorithm), []).append(answer.json())
        unauthorised = await c.post("/v1/chat/completions", json=chat("self-consistency"))
        assert unauthorised.status_code == 401
        spend = await get_json(c, "/dashboard/api/spend")

    def total(bodies: list[dict[str, Any]]) -> tuple[int, float]:
        return (sum(b["usage"]["total_tokens"] for b in bodies),
                sum(b["apportion"]["spent"]["usd"] for b in bodies))

    by_key = {row["key_id"]: row for row in spend["by_key"]}
    assert set(by_key) == {ids["alice"], ids["bob"], None}  # None: the request without a key
    for name in ("alice", "bob"):
        bodies = [b for (who, _), bs in usage.items() if who == name for b in bs]
        tokens, usd = total(bodies)
        row = by_key[ids[name]]
        assert (row["requests"], row["ok"], row["total_tokens"]) == (2, 2, tokens)
        assert row["usd"] == pytest.approx(usd, rel=1e-9)
        assert row["input_tokens"] + row["output_tokens"] == row["total_tokens"]
    assert (by_key[None]["requests"], by_key[None]["refused"], by_key[None]["total_tokens"]) == (1, 1, 0)
    by_algorithm = {row["algorithm"]: row for row in spend["by_algorithm"]}
    sc_tokens, sc_usd = total(usage[("alice", "self-consistency")] + usage[("bob", "self-consistency")])
    assert (by_algorithm["self-consistency"]["requests"], by_algorithm["self-consistency"]["total_tokens"]) == (
        2, sc_tokens)
    assert by_algorithm["self-consistency"]["usd"] == pytest.approx(sc_usd, rel=1e-9) and sc_usd > 0
    assert by_algorithm["self-consistency"]["generations"] == 5
    assert by_algorithm[None]["requests"] == 2  # the plain call and the refused one
    assert spend["total"]["requests"] == 5
    assert spend["total"]["total_tokens"] == sum(r["total_tokens"] for r in spend["by_key"])
    assert spend["by_key"][0]["usd"] >= spend["by_key"][1]["usd"]  # dearest first


class GatedBackend(ScriptedBackend):
    """Calls wait for ``release``: a request that stays in flight."""

    def __init__(self) -> None:
        super().__init__(["The answer is 7."], model="m", price=PRICE)
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def generate(self, prompt: Prompt, params: SamplingParams, *, deadline: float | None = None) -> Completion:
        self.entered.set()
        await self.release.wait()
        return await super().generate(prompt, params, deadline=deadline)


async def test_a_running_request_is_in_flight_until_it_finishes(keys):
    store, secrets, ids = keys
    gated = GatedBackend()
    board = Dashboard()
    async with client(app(board, lm=gated, quota=store)) as c:
        running = asyncio.create_task(c.post("/v1/chat/completions", json=chat("self-consistency", 4),
                                             headers={"Authorization": f"Bearer {secrets['bob']}"}))
        await asyncio.wait_for(gated.entered.wait(), 10)
        shown = await get_json(c, "/dashboard/api/requests")
        [live] = shown["in_flight"]
        assert (live["algorithm"], live["key_id"], live["route"], live["stream"]) == (
            "self-consistency", ids["bob"], "chat", False)
        assert live["budget"]["generations"] == 4 and live["elapsed_s"] >= 0 and live["started_at"].endswith("Z")
        assert shown["recent"] == []
        gated.release.set()
        answer = await running
        assert answer.status_code == 200
        shown = await get_json(c, "/dashboard/api/requests")
    assert shown["in_flight"] == []
    assert [r["request_id"] for r in shown["recent"]] == [live["request_id"]] == [answer.headers["x-request-id"]]


def finished(i: int, *, error: str | None = None, key: str | None = "k", algorithm: str | None = "sc",
             spent: Spend | None = None) -> RequestFinished:
    return RequestFinished(f"r{i}", "chat", algorithm, key, False, 200 if error is None else 400,
                           "ok" if error is None else "refused", 0.5, spent or Spend(), None, error)


def test_the_log_keeps_the_last_n_and_cuts_long_errors():
    log = RequestLog(3)
    log.request_started(RequestStarted("r9", "chat", "sc", Budget(generations=2), "k", True))
    for i in range(7):
        log.request_finished(finished(i, spent=Spend(generations=1, input_tokens=10, output_tokens=i,
                                                     usd=Fraction(1, 10**6))))
    log.request_finished(finished(7, error="x" * 5000))
    shown = log.requests()
    assert [r["request_id"] for r in shown["recent"]] == ["r7", "r6", "r5"]
    assert shown["finished_total"] == 8 and shown["capacity"] == 3
    assert len(shown["recent"][0]["error"]) <= 301 and shown["recent"][0]["error"].endswith("…")
    assert [r["request_id"] for r in shown["in_flight"]] == ["r9"]  # never finished: still in flight
    # the tallies count every request, not only those kept
    total = log.spend()["total"]
    assert (total["requests"], total["generations"], total["output_tokens"]) == (8, 7, sum(range(7)))
    assert total["usd"] == pytest.approx(7e-6) and total["refused"] == 1 and total["ok"] == 7
    log.request_finished(finished(9))
    assert log.requests()["in_flight"] == []


def test_options_are_checked():
    for bad in ({"recent": 0}, {"recent": 10**6}, {"refresh_s": 0}, {"token": ""}, {"token": "short"},
                {"token": " padded-token "}):
        with pytest.raises(ConfigError):
            DashboardOptions(**bad)
    with pytest.raises(ConfigError):
        RequestLog(0)


# -- the page --------------------------------------------------------------------------------------


async def test_the_page_and_its_assets():
    board = Dashboard(DashboardOptions(refresh_s=1.5))
    async with client(app(board)) as c:
        page = await c.get("/")
        script = await c.get("/dashboard/static/dashboard.js")
        style = await c.get("/dashboard/static/dashboard.css")
        missing = await c.get("/dashboard/static/secrets.txt")
        health = await c.get("/health")
        unknown = await c.get("/v1/unknown")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'data-refresh-ms="1500"' in page.text
    assert 'src="dashboard/static/dashboard.js"' in page.text and 'href="dashboard/static/dashboard.css"' in page.text
    # nothing inline and nothing from elsewhere: the policy forbids both, and the page needs neither
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "<script>" not in page.text and "http" not in page.text.replace("http-equiv", "")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "dashboard/api/requests" in script.text and "innerHTML" not in script.text
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert_error(missing, 404, "not_found")
    # the app behind the dashboard answers as before
    assert health.json()["status"] == "ok"
    assert_error(unknown, 404, "not_found")


# -- benchmark runs --------------------------------------------------------------------------------


async def test_runs_show_the_reports_curves_and_plot(tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    summary = json.loads((run / "summary.json").read_text())
    board = Dashboard(DashboardOptions(runs=(run,)))
    async with client(app(board)) as c:
        [shown] = (await get_json(c, "/dashboard/api/runs"))["runs"]
        assert (shown["run"], shown["dataset"], shown["model"], shown["questions"], shown["error"]) == (
            summary["run"], summary["dataset"], summary["model"], summary["questions"], None)
        assert shown["x_axis"] == "tokens"
        labels = {f"{r['system']}: {r['algorithm']}" + (f" ({r['scorer']})" if r["scorer"] else "")
                  for r in summary["rows"]}
        assert {c["label"] for c in shown["curves"]} == labels
        points = [p for curve in shown["curves"] for p in curve["points"]]
        assert len(points) == len(summary["rows"])
        assert all(p["tokens"] > 0 and 0 <= p["accuracy"] <= 1 for p in points)
        assert all(c["color"].startswith("#") for c in shown["curves"])

        plot = await c.get("/" + shown["plot"])
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        with Image.open(BytesIO(plot.content)) as image:
            assert image.format == "PNG" and image.width > 600 and image.height > 300
        assert (await c.get("/" + shown["plot"])).content == plot.content  # drawn once, then cached

        # a benchmark rewriting its summary: read again, a new plot address
        summary["rows"] = summary["rows"][:2]
        (run / "summary.json").write_text(json.dumps(summary))
        stat = (run / "summary.json").stat()
        os.utime(run / "summary.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        [again] = (await get_json(c, "/dashboard/api/runs"))["runs"]
        assert again["plot"] != shown["plot"] and sum(len(c["points"]) for c in again["curves"]) == 2

        # a summary that became unreadable: its error instead of its curves, and no plot
        (run / "summary.json").write_text("{not json")
        [broken] = (await get_json(c, "/dashboard/api/runs"))["runs"]
        assert broken["curves"] == [] and broken["plot"] is None and "not valid JSON" in broken["error"]
        assert_error(await c.get("/dashboard/runs/0/plot.png"), 404, "run_unreadable")
        assert_error(await c.get("/dashboard/runs/5/plot.png"), 404, "not_found")


async def test_without_runs_there_are_none():
    async with client(app(Dashboard())) as c:
        assert (await get_json(c, "/dashboard/api/runs")) == {"runs": []}
        assert_error(await c.get("/dashboard/runs/0/plot.png"), 404, "not_found")


def test_a_bad_run_directory_is_refused_at_start(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"summary\.json"):
        Dashboard(DashboardOptions(runs=(tmp_path / "nowhere",)))
    (tmp_path / "summary.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ConfigError, match="no rows"):
        Dashboard(DashboardOptions(runs=(tmp_path,)))


# -- who may look ----------------------------------------------------------------------------------


async def test_with_keys_and_no_token_only_loopback_clients_may_look(keys):
    store, secrets, _ = keys
    asgi = app(Dashboard(), quota=store)
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        async with client(asgi, host=host) as c:
            for path in PAGES:
                assert (await c.get(path)).status_code == 200, (host, path)
    async with client(asgi, host="10.1.2.3") as c:
        for path in API:
            assert_error(await c.get(path), 403, "dashboard_loopback_only")
        page = await c.get("/")
        assert page.status_code == 403 and "--dashboard-token" in page.text
        # an API key is not an admin credential
        forbidden = await c.get("/dashboard/api/spend", headers={"Authorization": f"Bearer {secrets['alice']}"})
        assert_error(forbidden, 403, "dashboard_loopback_only")


async def test_an_open_server_shows_its_dashboard_to_anyone():
    async with client(app(Dashboard()), host="10.1.2.3") as c:
        for path in PAGES:
            assert (await c.get(path)).status_code == 200, path


async def test_with_a_token_it_is_needed_from_everywhere(keys):
    store, _, _ = keys
    asgi = app(Dashboard(DashboardOptions(token=TOKEN)), quota=store)
    async with client(asgi) as c:  # loopback too
        for path in API:
            missing = await c.get(path)
            assert_error(missing, 401, "dashboard_token_required")
            assert missing.headers["www-authenticate"] == "Bearer"
            assert_error(await c.get(path, headers={"Authorization": "Bearer wrong-token"}), 401,
                         "invalid_dashboard_token")
            assert (await c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
        refused = await c.get("/")
        assert refused.status_code == 401 and "token" in refused.text
        assert (await c.get("/", params={"token": "wrong-token"})).status_code == 401
    async with client(asgi, host="10.1.2.3") as c:
        # /?token=... sets the cookie and sends the browser back to / without the token in its address
        opened = await c.get("/", params={"token": TOKEN})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"].lower()
        assert f"{COOKIE}=" in cookie and "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert c.cookies.get(COOKIE) == TOKEN
        for path in PAGES:
            assert (await c.get(path)).status_code == 200, path
    async with client(asgi, host="10.1.2.3", cookies={COOKIE: "wrong-token"}) as c:
        assert_error(await c.get("/dashboard/api/requests"), 401, "invalid_dashboard_token")


async def test_no_secret_is_ever_shown(keys):
    store, secrets, ids = keys
    board = Dashboard(DashboardOptions(token=TOKEN))
    async with client(app(board, quota=store)) as c:
        for name in ("alice", "bob"):
            answer = await c.post("/v1/chat/completions", json=chat("self-consistency"),
                                  headers={"Authorization": f"Bearer {secrets[name]}"})
            assert answer.status_code == 200
        await c.post("/v1/chat/completions", json=chat("self-consistency"),
                     headers={"Authorization": "Bearer not-a-key-but-maybe-a-typo-of-one"})
        shown = "".join([(await c.get(path, headers={"Authorization": f"Bearer {TOKEN}"})).text for path in PAGES])
    assert ids["alice"] in shown and ids["bob"] in shown
    for secret in (*secrets.values(), "not-a-key-but-maybe-a-typo-of-one"):
        assert secret not in shown
    assert TOKEN not in shown


# -- apportion serve -------------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[ServedApp]:
    with ServedApp(openai_app(ScriptedBackend(["The answer is 7."], model="up"))) as served:
        yield served


def serve_cli(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[int, str, Any]:
    """``apportion serve ARGS``: its exit code, its output, and the app it would serve (uvicorn is not started)."""
    started: list[Any] = []
    monkeypatch.setattr(apportion.serve, "serve", lambda a, **kw: started.append(a))
    result = CliRunner().invoke(app_cli, ["serve", *args])
    return result.exit_code, result.output, started[0] if started else None


def test_the_command_line_serves_the_dashboard(monkeypatch, upstream):
    # the command runs its own event loop (its backend check), so the app is exercised after it, in another
    backend = ["--base-url", upstream.base_url, "--model", "up"]
    code, output, served = serve_cli(monkeypatch, [*backend, "--runs", str(FIXTURE_RUN), "--dashboard-token", TOKEN])
    assert code == 0, output
    assert "dashboard on http://127.0.0.1:8000/ (open /?token=" in output and TOKEN not in output
    bearer = {"Authorization": f"Bearer {TOKEN}"}

    async def with_token() -> None:
        async with client(served, host="10.1.2.3") as c:
            assert_error(await c.get("/dashboard/api/runs"), 401, "dashboard_token_required")
            [run] = (await get_json(c, "/dashboard/api/runs", headers=bearer))["runs"]
            assert run["error"] is None and run["curves"]
            answer = await c.post("/v1/chat/completions", json={"model": "sc-2/up", "messages": QUESTION})
            assert answer.status_code == 200, answer.text
            [shown] = (await get_json(c, "/dashboard/api/requests", headers=bearer))["recent"]
            assert shown["algorithm"] == "self-consistency" and shown["request_id"] == answer.headers["x-request-id"]

    asyncio.run(with_token())

    code, output, served = serve_cli(monkeypatch, [*backend, "--no-dashboard"])
    assert code == 0 and "dashboard" not in output

    async def without() -> None:
        async with client(served) as c:
            assert (await c.get("/")).status_code == 404

    asyncio.run(without())

    monkeypatch.setenv("APPORTION_DASHBOARD_TOKEN", TOKEN)
    code, output, served = serve_cli(monkeypatch, backend)
    assert code == 0, output

    async def token_from_the_environment() -> None:
        async with client(served) as c:
            assert (await c.get("/dashboard/api/spend")).status_code == 401
            assert (await c.get("/dashboard/api/spend", headers=bearer)).status_code == 200

    asyncio.run(token_from_the_environment())


def test_the_command_line_refuses_a_bad_dashboard(monkeypatch, upstream, tmp_path):
    backend = ["--base-url", upstream.base_url, "--model", "up"]
    for args, words in (([*backend, "--runs", str(tmp_path)], "summary.json"),
                        ([*backend, "--dashboard-token", "short"], "at least 8 characters"),
                        ([*backend, "--no-dashboard", "--runs", str(FIXTURE_RUN)], "drop --no-dashboard")):
        code, output, served = serve_cli(monkeypatch, args)
        assert code == 2 and served is None, output
        assert words in output
