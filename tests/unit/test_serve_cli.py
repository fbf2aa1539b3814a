"""``apportion serve``: its options reach the app it serves (over a scripted backend served on
127.0.0.1, reached with --base-url as any server), and bad ones stop it before anything starts."""

from __future__ import annotations

import asyncio
import re
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


def test_keys_are_required_with_a_db_and_a_restart_charges_what_was_left_reserved(monkeypatch, upstream, tmp_path):
    """`apportion serve --db` serves keys made by `apportion keys create`: no key, 401; a key, its
    quota charged with what the run spent; the quota used up, 429. A reservation a killed server left
    open is charged at its grant when the next one starts."""
    import json

    from apportion.serve.keys import open_key_store
    from apportion.serve.quota_contract import Charge

    db = str(tmp_path / "keys.db")
    made = CliRunner().invoke(app, ["keys", "create", "alice", "--tokens-per-day", "500", "--db", db, "--json"])
    assert made.exit_code == 0, made.output
    secret = json.loads(made.output)["secret"]

    async def leave_one_open() -> None:  # a request in flight when its server was killed
        store = await open_key_store(db)
        try:
            await store.reserve(await store.authenticate(secret), "killed-mid-request", Charge(tokens=150, requests=1))
        finally:
            await store.aclose()

    asyncio.run(leave_one_open())
    started: list[Any] = []
    monkeypatch.setattr(apportion.serve, "serve", lambda a, *, host, port, log_level: started.append(a))
    result = CliRunner().invoke(app, ["serve", "--base-url", upstream.base_url, "--model", "up", "--db", db,
                                      "--replica", "one", "--max-budget", "gen=4,tokens=200", "--default-budget", "2"])
    assert result.exit_code == 0, result.output
    # the reservation was made under the default owner (the host name), not "one": it is not stale yet
    assert "charged" not in result.output
    result = CliRunner().invoke(app, ["serve", "--base-url", upstream.base_url, "--model", "up", "--db", db,
                                      "--max-budget", "gen=4,tokens=200", "--default-budget", "2"])
    assert "charged 1 reservation(s)" in " ".join(result.output.split())
    served = started[-1]
    question = [{"role": "user", "content": "What is 3 + 4?"}]

    async def ask() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://test") as c:
            anonymous = await c.post("/v1/chat/completions", json={"model": "sc-2/up", "messages": question})
            auth = {"Authorization": f"Bearer {secret}"}
            replies = [anonymous]
            for _ in range(12):
                replies.append(await c.post("/v1/chat/completions", headers=auth,
                                            json={"model": "sc-2/up", "messages": question}))
            return replies

    anonymous, *asked = asyncio.run(ask())
    assert anonymous.status_code == 401
    ok = [r for r in asked if r.status_code == 200]
    refused = [r for r in asked if r.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 12
    assert asked.index(refused[0]) == len(ok)  # every request ran until the quota had nothing left
    assert re.match(r"the key's quota had \d+ tokens left this period, too few for this request",
                    refused[0].json()["error"]["message"])
    usage = CliRunner().invoke(app, ["keys", "usage", "alice", "--db", db, "--json"])
    used = json.loads(usage.output)
    spent = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used["spent"]["tokens"] == 150 + spent and used["open_reservations"] == 0
