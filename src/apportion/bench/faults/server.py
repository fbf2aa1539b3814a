"""A misbehaving OpenAI-compatible server on 127.0.0.1, written against raw sockets so it can fail
the ways real servers and proxies do, below what an HTTP framework would let it: bodies cut off
mid-byte, connections reset before a status line, bytes dripped slower than any read timeout,
replies that never come.

Each request gets one fault, drawn from ``shares`` with a seeded generator (or taken in order
from a script). Tokens are whitespace-separated words, as in the scripted backend, and the server
keeps the ground truth a paid API would bill: every token it generated, whether or not the reply
reached the client (``Billing``).

Faults:
- ``ok``: a correct reply, ``n`` honoured.
- ``one``: one choice whatever ``n`` (llama.cpp's server ignores ``n``).
- ``short``: a random number of choices below ``n``.
- ``extra``: two choices more than ``n``.
- ``long``: ignores ``max_tokens`` (samples up to three times longer), and says so in its usage.
- ``lying``: reports half the completion tokens it generated, where it sends log-probabilities
  (which give it away); without them a lie cannot be caught, so it answers correctly then.
- ``nousage``: a correct reply without ``usage``.
- ``nochoices``: 200 with usage and an empty ``choices`` list (generated and billed, nothing sent).
- ``empty``: 200 with an empty body (generated and billed).
- ``garbage``: 200 with a body that is not JSON, or not UTF-8 (generated and billed).
- ``truncate``: 200 whose body stops half way and the connection closes (generated and billed).
- ``drip``: 200 whose body arrives a byte at a time, slower than a client can wait (billed).
- ``hang``: takes the request and never answers (generation billed: the client cannot know).
- ``reset``: closes the connection without a reply, before generating (nothing billed).
- ``500``, ``503``, ``429``: errors before any generation (nothing billed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FAULTS = ("ok", "one", "short", "extra", "long", "lying", "nousage", "nochoices", "empty", "garbage", "truncate",
          "drip", "hang", "reset", "500", "503", "429")
GENERATING = frozenset(FAULTS) - {"reset", "500", "503", "429"}
"""Faults that happen after the server generated: a paid API bills these."""
FAULT_MODEL = "fault-model"

ReplyFn = Callable[[dict[str, Any], random.Random], str]


def default_reply(body: dict[str, Any], rng: random.Random) -> str:
    """A short worked answer whose length varies, so ``max_tokens`` and usage matter."""
    filler = " ".join(rng.choice(["so", "we", "add", "the", "two", "numbers", "then", "check"])
                      for _ in range(rng.randint(0, 30)))
    return f"{filler} The answer is {rng.choice([42, 42, 42, 41, 7])}."


@dataclass
class Billing:
    """What the server did, as a paid API would account for it."""

    requests: int = 0
    prompt_tokens: int = 0
    """Prompt tokens of every request that generated (billed)."""
    completion_tokens: int = 0
    """Tokens generated, delivered or not (billed)."""
    samples_delivered: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "samples_delivered": self.samples_delivered,
                "faults": dict(sorted(self.faults.items()))}


class FaultServer:
    """``with FaultServer(shares={"ok": 0.6, "hang": 0.05, ...}) as server: ... server.base_url``."""

    def __init__(self, shares: Mapping[str, float] | None = None, *, script: Sequence[str] | None = None,
                 seed: int = 0, model: str = FAULT_MODEL, reply: ReplyFn = default_reply, logprobs: bool = True,
                 drip_interval_s: float = 0.5, hang_s: float = 3600.0) -> None:
        shares = dict(shares or {"ok": 1.0})
        unknown = (set(shares) | set(script or ())) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}; known: {', '.join(FAULTS)}")
        if any(v < 0 for v in shares.values()) or sum(shares.values()) <= 0:
            raise ValueError(f"fault shares must be >= 0 and not all zero: {shares}")
        self.shares = shares
        self.script = list(script) if script is not None else None
        self.model = model
        self.reply = reply
        self.logprobs = logprobs
        self.drip_interval_s = drip_interval_s
        self.hang_s = hang_s
        self.billing = Billing()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}/v1"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FaultServer:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
            self._port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=main, name="fault-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP, by hand --------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, body = request
                if not await self._answer(method, path, body, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            pass  # a client that went away, or the server stopping: either way this connection ends
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter) -> bool:
        """Reply to one request; False when the connection must close."""
        if method == "GET" and path.rstrip("/") == "/v1/models":
            await _send(writer, 200, json.dumps({"object": "list", "data": [{"id": self.model}]}).encode())
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await _send(writer, 404, b'{"error": {"message": "no such route"}}')
            return True
        try:
            body = json.loads(raw)
        except ValueError:
            await _send(writer, 400, b'{"error": {"message": "body is not JSON"}}')
            return True
        fault = self._next_fault()
        if fault in ("500", "503", "429"):
            headers = {"Retry-After": "0"} if fault == "429" else {}
            await _send(writer, int(fault), json.dumps({"error": {"message": f"fault {fault}"}}).encode(), headers)
            return True
        if fault == "reset":
            return False
        payload = self._generate(body, fault)
        data = json.dumps(payload).encode()
        if fault == "empty":
            data = b""
        elif fault == "garbage":
            data = self._pick([b"<html>502 Bad Gateway</html>", b'{"choices": [{"text": "\xff\xfe broken"}]}',
                               b"null", b'{"choices": "none"}'])
        if fault == "hang":
            await asyncio.sleep(self.hang_s)
            return False
        if fault == "truncate":
            await _send(writer, 200, data, cut=max(1, len(data) // 2))
            return False
        if fault == "drip":
            await _send(writer, 200, data, drip_s=self.drip_interval_s)
            return False
        await _send(writer, 200, data)
        return True

    def _next_fault(self) -> str:
        with self._lock:
            self.billing.requests += 1
            if self.script is not None:
                fault = self.script.pop(0) if self.script else "ok"
            else:
                names = sorted(self.shares)
                fault = self._rng.choices(names, weights=[self.shares[k] for k in names])[0]
            self.billing.faults[fault] += 1
            return fault

    def _pick(self, options: Sequence[bytes]) -> bytes:
        with self._lock:
            return self._rng.choice(list(options))

    def _generate(self, body: dict[str, Any], fault: str) -> dict[str, Any]:
        """The reply the fault degrades, billed as generated."""
        with self._lock:
            rng = random.Random(self._rng.random())
        n = max(1, int(body.get("n", 1)))
        max_tokens = int(body.get("max_tokens") or 16)
        if fault == "one":
            n = 1
        elif fault == "short":
            n = 1 if n == 1 else rng.randint(1, n - 1)
        elif fault == "extra":
            n += 2
        chat = "messages" in body
        prompt_text = " ".join(str(m.get("content", "")) for m in body["messages"]) if chat else str(
            body.get("prompt", ""))
        prompt_tokens = len(prompt_text.split()) + (3 * len(body["messages"]) if chat else 0)
        limit = 3 * max_tokens if fault == "long" else max_tokens
        choices, completion_tokens = [], 0
        want_lp = bool(self.logprobs and body.get("logprobs"))
        for i in range(n):
            words = self.reply(body, rng).split()
            if fault == "long":
                words = (words * (1 + limit // max(1, len(words))))[: rng.randint(max_tokens + 1, limit)]
            finish = "length" if len(words) >= limit else "stop"
            words = words[:limit]
            completion_tokens += len(words)
            text = " ".join(words)
            choice: dict[str, Any] = {"index": i, "finish_reason": finish}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if want_lp:
                    choice["logprobs"] = {"content": [{"token": w, "logprob": -0.25} for w in words]}
            else:
                choice["text"] = text
                if want_lp:
                    choice["logprobs"] = {"token_logprobs": [-0.25] * len(words)}
            choices.append(choice)
        reported = completion_tokens // 2 if fault == "lying" and want_lp else completion_tokens
        out: dict[str, Any] = {"id": "fault", "object": "chat.completion" if chat else "text_completion",
                               "model": self.model, "choices": [] if fault == "nochoices" else choices}
        if fault != "nousage":
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": reported,
                            "total_tokens": prompt_tokens + reported}
        with self._lock:
            self.billing.prompt_tokens += prompt_tokens
            self.billing.completion_tokens += completion_tokens
            if fault in ("ok", "one", "short", "extra", "long", "lying", "nousage"):
                self.billing.samples_delivered += len(choices)
        return out


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return method, path, body


async def _send(writer: asyncio.StreamWriter, status: int, data: bytes, headers: dict[str, str] | None = None, *,
                cut: int | None = None, drip_s: float = 0.0) -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Status")
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(data)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
    if drip_s:
        for i in range(len(data)):
            writer.write(data[i: i + 1])
            await writer.drain()
            await asyncio.sleep(drip_s)
        return
    writer.write(data if cut is None else data[:cut])
    await writer.drain()
