"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose behaviour a test scripts.

Tokens are whitespace-separated words, as in the scripted backend, so tests can predict usage.
Faults are consumed one per request, in order: "400", "500", "429", "timeout" (answers only after the
client has given up), "malformed" (200 with a broken body), "nochoices", "disconnect" (closes
the connection without a reply). The server keeps an exact account of what it billed: the usage
of every well-formed 200 response it sent, and when each request arrived and how many were in
flight at once (``arrivals``, ``peak_in_flight``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.loopback import JsonHandler, LoopbackServer, start, stop

ReplyFn = Callable[[dict[str, Any], int], str]


def _words(text: str) -> int:
    return len(text.split())


@dataclass
class Billing:
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    choices: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)


class FakeOpenAI:
    def __init__(self, reply: ReplyFn | None = None, *, honor_n: bool = True, usage: bool = True,
                 logprobs: bool = True, model: str = "fake-model", faults: list[str] | None = None,
                 timeout_sleep_s: float = 1.5, delay_s: float = 0.0) -> None:
        self.reply = reply or (lambda body, i: "Adding them up gives 42. The answer is 42.")
        self.honor_n = honor_n
        self.usage = usage
        self.logprobs = logprobs
        self.model = model
        self.faults = list(faults or [])
        self.timeout_sleep_s = timeout_sleep_s
        self.delay_s = delay_s
        self.billing = Billing()
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None
        self._counter = 0
        self.arrivals: list[float] = []
        """time.monotonic() at which each request's body was read, in the order of billing.bodies."""
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.billing.requests += 1
                    fake.billing.bodies.append(body)
                    fake.arrivals.append(time.monotonic())
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                    fault = fake.faults.pop(0) if fake.faults else "ok"
                try:
                    self._answer(body, fault)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, body: dict[str, Any], fault: str) -> None:
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if fault == "500":
                    return self._send(500, {"error": {"message": "internal error"}})
                if fault == "400":
                    return self._send(400, {"error": {"message": "max_tokens is too large for this model"}})
                if fault == "429":
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if fault == "timeout":
                    time.sleep(fake.timeout_sleep_s)
                    return self._send(200, fake._response(body, bill=False), ignore_errors=True)
                if fault == "malformed":
                    return self._raw(200, b'{"choices": [ {"message": ')
                if fault == "nochoices":
                    return self._send(200, {"object": "chat.completion", "choices": []})
                if fault == "disconnect":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                if body.get("model") != fake.model:
                    return self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
                return self._send(200, fake._response(body, bill=True))

        self._server = start(Handler)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self._server)

    def _response(self, body: dict[str, Any], bill: bool) -> dict[str, Any]:
        n = int(body.get("n", 1)) if self.honor_n else 1
        max_tokens = int(body.get("max_tokens", 16))
        chat = "messages" in body
        prompt_text = " ".join(m["content"] for m in body["messages"]) if chat else body.get("prompt", "")
        prompt_tokens = _words(prompt_text) + (3 * len(body["messages"]) if chat else 0)
        choices, completion_tokens = [], 0
        for i in range(n):
            with self._lock:
                index = self._counter
                self._counter += 1
            words = self.reply(body, index).split()
            finish = "length" if len(words) > max_tokens else "stop"
            words = words[:max_tokens]
            text = " ".join(words)
            completion_tokens += len(words)
            choice: dict[str, Any] = {"index": i, "finish_reason": finish}
            # alternatives: the sampled word at -0.25, then -1, -1.5, ... (what top_logprobs lists)
            k = int(body.get("top_logprobs") or 0) if chat else int(body.get("logprobs") or 0)
            tops = [[-0.25] + [-1.0 - 0.5 * j for j in range(k - 1)] for _ in words]
            lp = [{"token": w, "logprob": -0.25,
                   "top_logprobs": [{"token": f"{w}~{j}", "logprob": v} for j, v in enumerate(top)]}
                  for w, top in zip(words, tops)]
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if self.logprobs and body.get("logprobs"):
                    choice["logprobs"] = {"content": lp}
            else:
                choice["text"] = text
                if self.logprobs and body.get("logprobs"):
                    choice["logprobs"] = {"token_logprobs": [-0.25] * len(words),
                                          "top_logprobs": [{f"{w}~{j}": v for j, v in enumerate(top)}
                                                           for w, top in zip(words, tops)]}
            choices.append(choice)
        out: dict[str, Any] = {"id": "cmpl-fake", "object": "chat.completion", "model": self.model,
                               "choices": choices}
        if self.usage:
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
        if bill:
            with self._lock:
                self.billing.ok += 1
                self.billing.prompt_tokens += prompt_tokens
                self.billing.completion_tokens += completion_tokens
                self.billing.choices += len(choices)
        return out
