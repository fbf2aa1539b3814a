"""``apportion serve``: its options reach the app it serves (over a scripted backend served on
127.0.0.1, reached with --base-url as any server), and bad ones stop it before anything starts."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import apportion.serve
from apportion.cli import app
from apportion.lm.scripted import ScriptedBackend
from apportion.serve import ServedApp, openai_app


@pytest.fixture
def upstream():
    with ServedApp(openai_app(ScriptedBackend(["The answer is 7."], model="up"))) as served:
        yield served


def served_app(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[Any, str, int]:
    """What ``apportion serve ARGS`` would serve (uvicorn is not started)."""
    started: list[tuple[Any, str, int]] = []
    monkeypatch.setattr(apportion.serve, "serve", lambda a, *, host, port, log_level: started.append((a, host, port)))
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 0, result.output
    [served] = started
    return served


def test_the_options_reach_the_app(monkeypatch, upstream):
    served, host, port = served_app(monkeypatch, [
        "--base-url", upstream.base_url, "--model", "up", "--port", "8123", "--default-budget", "gen=3",
        "--max-budget", "gen=4,tokens=5000", "--temperature", "0.4", "--max-tokens", "64", "--system-prompt", ""])
    assert (host, port) == ("127.0.0.1", 8123)
    question = [{"role": "user", "content": "What is 3 + 4?"}]

    async def ask() -> tuple[httpx.Response, httpx.Response]:  # the CLI ran its own event loop; here is another
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://test") as c:
            ok = await c.post("/v1/chat/completions", json={"model": "sc/up", "messages": question})
            over = await c.post("/v1/chat/completions", json={"model": "sc-5/up", "messages": question})
        return ok, over

    ok, over = asyncio.run(ask())
    body = ok.json()
    assert body["apportion"]["budget"] == {"generations": 3, "total_tokens": 5000}
    assert body["apportion"]["spent"]["generations"] == 3 and body["apportion"]["answer"] == "7"
    sampling = body["apportion"]["options"]["sampling"]
    assert (sampling["temperature"], sampling["max_tokens"], sampling["system_prompt"]) == (0.4, 64, None)
    assert over.status_code == 400 and "generations 5 > 4" in over.json()["error"]["message"]


@pytest.mark.parametrize(("args", "message"), [
    (["--max-budget", "gen=-1"], "must be > 0"),
    (["--default-budget", "gen=100"], "exceeds the maximum per request"),
    (["--process-scorer", "vibes"], "unknown process scorer"),
    (["--scorer", "vibes"], "unknown scorer"),
    (["--base-url", "http://127.0.0.1:9/v1"], "--base-url needs --model"),
])
def test_bad_options_stop_it_before_it_starts(monkeypatch, args, message):
    monkeypatch.setattr(apportion.serve, "serve", lambda *a, **kw: pytest.fail("it should not have started"))
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
