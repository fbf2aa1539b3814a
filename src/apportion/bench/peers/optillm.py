"""optillm's own ``bon`` and ``self_consistency`` approaches, through its proxy.

The proxy is optillm's own server (the ``optillm`` command, found beside this interpreter or on
PATH, so it may live in another environment: its full install pulls torch and pins an older
starlette). It is started per cell in front of the peer endpoint, and asked with the approach as
the model-name prefix. How the budget maps:

- ``bon``: N is the server-wide ``--best-of-n`` flag, so each budget gets its own proxy. It asks
  for N samples in one request, then rates each with one more call; its ratings reach the
  endpoint too (counted, and on a replay endpoint they fail: they are not in the bank).
- ``self_consistency``: optillm draws a fixed 5 samples (no setting changes it) at temperature 1
  and clusters whole texts; it runs once, at budget 5, whatever budgets the grid has.

optillm wraps the user's text as ``"User: <text>"``; ``unwrap`` undoes that so a replay endpoint
can find the question in its bank.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from apportion.algorithms.base import SamplingOptions
from apportion.banks import Problem
from apportion.bench.peers.reply import PeerReply, PeerSearch
from apportion.lm.base import Message, Prompt
from apportion.serve.runner import bind_free_port

ALGORITHMS = {"best-of-n": "bon", "self-consistency": "self_consistency"}
FIXED_BUDGET = {"self-consistency": 5}
_START_S = 90.0
# one question's whole approach (samples and ratings, one after another) on a slow CPU model
_REQUEST_S = 900.0
_WRAP = "User: "


def executable() -> str | None:
    beside = Path(sys.executable).with_name("optillm")
    return str(beside) if beside.is_file() else shutil.which("optillm")


def available() -> str | None:
    if executable() is None:
        return "optillm is not installed (no `optillm` command beside this Python or on PATH); pip install optillm"
    return None


def scorer(algorithm: str, search: PeerSearch | None = None) -> str | None:
    return "llm-rating" if algorithm == "best-of-n" else None


def fixed_budget(algorithm: str) -> int | None:
    return FIXED_BUDGET.get(algorithm)


def rewrite_body(body: dict[str, Any]) -> dict[str, Any]:
    return body


def unwrap(prompt: Prompt) -> Prompt:
    """The prompt as the user sent it, before optillm prefixed the last user message."""
    messages = list(prompt.messages)
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            if messages[i].content.startswith(_WRAP):
                messages[i] = Message("user", messages[i].content[len(_WRAP):])
            break
    return Prompt(messages=tuple(m for m in messages if m.content or m.role != "system"), text=prompt.text,
                  assistant_prefix=prompt.assistant_prefix)


class Proxy:
    """optillm's server on a free port of 127.0.0.1, in front of ``upstream``."""

    def __init__(self, upstream: str, best_of_n: int) -> None:
        sock = bind_free_port()
        self.port = sock.getsockname()[1]
        sock.close()
        command = executable()
        assert command is not None
        # OPENAI_API_KEY makes optillm use an OpenAI client on --base-url; OPTILLM_API_KEY must stay
        # unset (it switches optillm to local inference with model downloads).
        env = {k: v for k, v in os.environ.items() if k != "OPTILLM_API_KEY"}
        env.update(OPENAI_API_KEY="sk-none", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # its log goes to a file: an unread pipe fills up and blocks the proxy mid-run
        self._log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [command, "--base-url", upstream, "--port", str(self.port), "--host", "127.0.0.1",
             "--best-of-n", str(best_of_n)],
            env=env, stdout=subprocess.DEVNULL, stderr=self._log, text=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait(self) -> None:
        deadline = time.monotonic() + _START_S
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                if self._proc.poll() is not None:
                    self._log.seek(0)
                    raise RuntimeError(f"optillm exited with {self._proc.returncode}: {self._log.read()[-800:]}")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"optillm did not start within {_START_S:.0f} s")
                await asyncio.sleep(0.3)

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def needs_search(algorithm: str) -> bool:
    return False


def refuses(algorithm: str, budget: int, search: PeerSearch | None) -> str | None:
    return None


async def answer(algorithm: str, base_url: str, model: str, problems: Sequence[Problem], budget: int,
                 sampling: SamplingOptions, *, seed: int, concurrency: int, search: PeerSearch | None = None,
                 on_reply: Callable[[int, PeerReply], None] | None = None) -> list[PeerReply]:
    """One reply per problem, in order (each also to ``on_reply`` with its index as it comes);
    optillm has no step-wise search, so ``search`` is unused."""
    try:
        proxy = Proxy(base_url, budget)
    except OSError as exc:
        return [PeerReply(None, f"optillm could not start: {exc}")] * len(problems)
    try:
        await proxy.wait()
    except RuntimeError as exc:
        proxy.stop()
        return [PeerReply(None, str(exc))] * len(problems)
    limit = asyncio.Semaphore(concurrency)
    messages = [{"role": "system", "content": sampling.system_prompt}] if sampling.system_prompt else []

    async def ask(client: httpx.AsyncClient, problem: Problem) -> PeerReply:
        body = {"model": f"{ALGORITHMS[algorithm]}-{model}", "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "messages": [*messages, {"role": "user", "content": problem.question}]}
        async with limit:
            started = time.monotonic()
            try:
                reply = await client.post(f"{proxy.url}/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                return PeerReply(None, f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        seconds = time.monotonic() - started
        if reply.status_code != 200:
            return PeerReply(None, f"HTTP {reply.status_code}: {reply.text[:300]}", seconds=seconds)
        try:
            return PeerReply(reply.json()["choices"][0]["message"]["content"], None, seconds=seconds)
        except (ValueError, KeyError, IndexError) as exc:
            return PeerReply(None, f"malformed reply ({exc}): {reply.text[:300]}", seconds=seconds)

    async def one(client: httpx.AsyncClient, index: int, problem: Problem) -> PeerReply:
        reply = await ask(client, problem)
        if on_reply is not None:
            on_reply(index, reply)
        return reply

    try:
        async with httpx.AsyncClient(timeout=_REQUEST_S) as client:
            return list(await asyncio.gather(*(one(client, i, p) for i, p in enumerate(problems))))
    finally:
        proxy.stop()
