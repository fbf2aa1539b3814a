"""A process reward model server on 127.0.0.1 that follows vLLM's Pooling API as it serves
Qwen2.5-Math-PRM: ``POST /pooling`` with ``{"model", "input"}`` (a text or a list of texts) or
``{"model", "messages"}``; one ``[p_wrong, p_right]`` pair per ``<extra_0>`` in the assistant
turn; ``usage.prompt_tokens``.

Scores come from ``score(question, step)``: by default 0.9, or 0.1 for a step containing "wrong".
Prompt tokens are whitespace-separated words plus one per separator, so tests can predict them.
Faults are consumed one per request, in order: "400", "404", "500", "429", "timeout" (answers only
after the client gave up), "malformed" (a 200 that is not JSON), "short" (one pair fewer than
steps), "extra" (one pair more), "noindex" (an item without its index), "badprob" (a
probability above 1), "nousage" (no usage).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.loopback import JsonHandler, LoopbackServer, start, stop

SEP = "<extra_0>"
ScoreFn = Callable[[str, str], float]


def _default_score(question: str, step: str) -> float:
    return 0.1 if "wrong" in step else 0.9


def chat_parts(text: str) -> dict[str, str]:
    """The ChatML turns of ``text`` by role."""
    parts = {}
    for turn in text.split("<|im_start|>")[1:]:
        role, _, rest = turn.partition("\n")
        parts[role] = rest.split("<|im_end|>")[0]
    return parts


@dataclass
class PRMBilling:
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)



class FakePRM:
    def __init__(self, score: ScoreFn | None = None, *, model: str = "fake-prm", faults: list[str] | None = None,
                 timeout_sleep_s: float = 1.5) -> None:
        self.score = score or _default_score
        self.model = model
        self.faults = list(faults or [])
        self.timeout_sleep_s = timeout_sleep_s
        self.billing = PRMBilling()
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakePRM:
        fake = self

        class Handler(JsonHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with fake._lock:
                    fake.billing.requests += 1
                    fake.billing.bodies.append(body)
                    fault = fake.faults.pop(0) if fake.faults else "ok"
                if self.path != "/pooling":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                return self._answer(body, fault)

            def _answer(self, body: dict[str, Any], fault: str) -> None:
                if fault in ("400", "404", "500", "429"):
                    return self._send(int(fault), {"error": {"message": f"fault {fault}"}})
                if fault == "timeout":
                    time.sleep(fake.timeout_sleep_s)
                    return self._send(200, {"data": []}, ignore_errors=True)
                if fault == "malformed":
                    return self._raw(200, b'{"data": [ {"index": ')
                if body.get("model") != fake.model:
                    return self._send(404, {"error": {"message": f"model {body.get('model')} not found"}})
                reply = fake._reply(body, fault)
                return self._send(200, reply)

        self._server = start(Handler)
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self._server)

    def _reply(self, body: dict[str, Any], fault: str) -> dict[str, Any]:
        if "messages" in body:
            turns = {m["role"]: m["content"] for m in body["messages"]}
            texts = [("".join(f"{m['role']} {m['content']} " for m in body["messages"]), turns)]
        else:
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            texts = [(t, chat_parts(t)) for t in inputs]
        data, tokens = [], 0
        for index, (text, turns) in enumerate(texts):
            steps = turns.get("assistant", "").split(SEP)[:-1]  # the text after the last separator is not a step
            pairs = [[1 - (p := self.score(turns.get("user", ""), s)), p] for s in steps]
            if fault == "short":
                pairs = pairs[:-1]
            elif fault == "extra":
                pairs = [*pairs, [0.5, 0.5]]
            elif fault == "badprob":
                pairs = [[-0.5, 1.5] for _ in pairs]
            item: dict[str, Any] = {"index": index, "object": "pooling", "data": pairs}
            if fault == "noindex":
                del item["index"]
            data.append(item)
            tokens += len(text.split()) + text.count(SEP)
        reply: dict[str, Any] = {"id": "pool-fake", "object": "list", "created": 0, "model": self.model, "data": data}
        if fault != "nousage":
            reply["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        with self._lock:
            self.billing.ok += 1
            self.billing.prompt_tokens += tokens
        return reply
