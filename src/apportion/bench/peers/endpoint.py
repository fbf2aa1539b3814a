"""The endpoint peers are pointed at: any backend served over the OpenAI protocol, counting what
each question consumed.

Peers' own accounts are incomplete (its-hub leaves out its judge's calls; optillm reports no
prompt tokens and drops truncated samples), so every request they make is counted here, on the
server side, and matched to its question (after ``rewrite``, which undoes a peer's known wrapping of the
question): by the last user message, else by the first question
whose text appears in any message (a judge's prompt quotes the question it grades).

``rewrite_body`` likewise undoes a peer's known quirk in a request's JSON before the server reads
it (its-hub repeats vLLM's fields in a literal ``extra_body``, which a strict server refuses).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apportion.banks import Problem
from apportion.budget.units import Price, Usage
from apportion.errors import ModelNotFound
from apportion.lm.base import Backend, Capabilities, Completion, Prompt, SamplingParams
from apportion.serve.openai_app import openai_app
from apportion.serve.runner import ServedApp

UNMATCHED = "(unmatched)"


class CountingBackend:
    """A backend that passes every call through and keeps per-question usage and call counts."""

    def __init__(self, inner: Backend, problems: Sequence[Problem],
                 rewrite: Callable[[Prompt], Prompt] | None = None) -> None:
        self.inner = inner
        self._rewrite = rewrite or (lambda prompt: prompt)
        self._by_question = {p.question: p.id for p in problems}
        self._problems = list(problems)
        self._lock = threading.Lock()
        self.usage: dict[str, Usage] = defaultdict(Usage)
        self.calls: dict[str, int] = defaultdict(int)
        self.refused = 0
        """Requests for prompts the inner backend does not know (a replay's 404s)."""

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def price(self) -> Price:
        return self.inner.price

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def prompt_tokens(self, prompt: Prompt) -> int:
        return await self.inner.prompt_tokens(prompt)

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        prompt = self._rewrite(prompt)
        try:
            completion = await self.inner.generate(prompt, params, deadline=deadline)
        except ModelNotFound:
            with self._lock:
                self.refused += 1
            raise
        key = self.question_of(prompt)
        with self._lock:
            self.usage[key] = self.usage[key] + completion.usage
            self.calls[key] += 1
        return completion

    def question_of(self, prompt: Prompt) -> str:
        texts = [m.content for m in prompt.messages] or [prompt.text or ""]
        users = [m.content for m in prompt.messages if m.role == "user"]
        for text in (users[-1:] if users else []) + texts:
            if text in self._by_question:
                return self._by_question[text]
        for problem in self._problems:
            if any(problem.question in text for text in texts):
                return problem.id
        return UNMATCHED

    async def aclose(self) -> None:
        await self.inner.aclose()


BodyRewrite = Callable[[dict[str, Any]], dict[str, Any]]


class _RewrittenBodies:
    """An ASGI wrapper handing the app each POST's JSON object after ``rewrite`` (anything else as sent)."""

    def __init__(self, app: ASGIApp, rewrite: BodyRewrite) -> None:
        self.app = app
        self.rewrite = rewrite

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to rewrite
                await self.app(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            parsed = None  # the app says what is wrong with it
        if isinstance(parsed, dict):
            body = json.dumps(self.rewrite(parsed)).encode()
        pending = [body]

        async def replay() -> Message:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class PeerEndpoint:
    """``with PeerEndpoint(backend, problems) as ep: ... ep.base_url ... ep.counter.usage``."""

    def __init__(self, backend: Backend, problems: Sequence[Problem],
                 rewrite: Callable[[Prompt], Prompt] | None = None,
                 rewrite_body: BodyRewrite | None = None) -> None:
        self.counter = CountingBackend(backend, problems, rewrite)
        app: ASGIApp = openai_app(self.counter)
        self._served = ServedApp(app if rewrite_body is None else _RewrittenBodies(app, rewrite_body))

    @property
    def base_url(self) -> str:
        return self._served.base_url

    @property
    def model(self) -> str:
        return self.counter.model

    def __enter__(self) -> PeerEndpoint:
        self._served.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._served.stop()
