"""`apportion serve` as a user runs it: its own process, the embedded model, the official OpenAI
client, streaming, an API key and its quota."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT, free_port, run_cli

QUESTION = "Tom has 3 apples and gets 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server on the embedded model with keys on; yields (base URL, a key's secret, the key db)."""
    db = str(tmp_path_factory.mktemp("keys") / "keys.db")
    made = run_cli("keys", "create", "tester", "--tokens-per-day", "20000", "--db", db, "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    port = free_port()
    log = (ROOT / ".pytest_cache" / "apportion_serve.log")
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "apportion", "serve", "--port", str(port), "--db", db,
                                 "--max-tokens", "48", "--max-budget", "gen=8,tokens=4000"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"})
        try:
            base = f"http://127.0.0.1:{port}/v1"
            _wait_health(base, proc)
            yield base, secret, db
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _wait_health(base: str, proc: subprocess.Popen) -> None:
    """Until /health answers (it needs no key; /models does, with keys on)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"apportion serve exited with {proc.returncode}")
        try:
            if httpx.get(base.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("apportion serve did not come up")


def test_the_openai_client_runs_an_algorithm_streams_it_and_the_key_pays(served):
    base, secret, db = served
    client = openai.OpenAI(base_url=base, api_key=secret)
    [model] = [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(model=f"sc-3/{model}", messages=[{"role": "user", "content": QUESTION}],
                                           seed=1)
    extra = reply.model_extra["apportion"]
    assert extra["algorithm"] == "self-consistency" and extra["spent"]["generations"] == 3
    assert reply.usage.total_tokens == extra["spent"]["input_tokens"] + extra["spent"]["output_tokens"] > 0
    assert reply.choices[0].message.content

    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], stream=True,
        stream_options={"include_usage": True}, seed=2,
        extra_body={"apportion": {"algorithm": "self-consistency", "budget": {"gen": 2, "tokens": 3000}}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [c.usage for c in chunks if c.usage is not None]
    assert text and streamed and streamed[-1].total_tokens > 0

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="ap-wrong").chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTION}])

    usage = run_cli("keys", "usage", "tester", "--db", db, "--json")
    spent = json.loads(usage.stdout)["spent"]
    assert spent["tokens"] == reply.usage.total_tokens + streamed[-1].total_tokens
    assert spent["requests"] == 2
