"""A deterministic backend whose replies are chosen by the test, for unit tests of logic.

Tokens are whitespace-separated words, so a test can predict every figure: a prompt costs its
words plus ``overhead`` per message, a sample its words (cut at ``max_tokens``). Replies come
from a list (cycled, one per sample across calls) or from a function of (prompt, params,
call index, sample index).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from apportion.budget.units import Price, Usage
from apportion.errors import BackendError
from apportion.lm.base import Capabilities, Completion, Prompt, Sample, SamplingParams


@dataclass(frozen=True, slots=True)
class Reply:
    """A scripted reply; ``logprobs`` default to -0.1 per token, or one value for all tokens.
    ``reasoning`` is thinking returned apart from the text, as reasoning servers do (its words
    are tokens too, generated before the text). ``confidence`` is every token's top-k confidence,
    or one per token (given where ``top_logprobs`` is asked for)."""

    text: str
    logprob: float | None = -0.1
    error: BackendError | None = None
    reasoning: str | None = None
    confidence: float | tuple[float, ...] = 3.0


ReplyFn = Callable[[Prompt, SamplingParams, int, int], "str | Reply"]


@dataclass(slots=True)
class ScriptedCall:
    prompt: Prompt
    params: SamplingParams
    deadline: float | None


@dataclass
class ScriptedBackend:
    replies: Sequence[str | Reply] | ReplyFn
    model: str = "scripted"
    native_n: bool = True
    logprobs: bool = True
    price: Price = field(default_factory=Price)
    overhead: int = 3
    latency_s: float = 0.0
    calls: list[ScriptedCall] = field(default_factory=list)
    _counter: itertools.count = field(default_factory=itertools.count, repr=False)
    cached_prompt_tokens: int = 0
    """Tokens of every prompt reported as served from a prefix cache (at most the prompt's), as a
    server with a prefix cache reports them (``Usage.cached_input_tokens``)."""

    @property
    def name(self) -> str:
        return "scripted"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(native_n=self.native_n, logprobs=self.logprobs, continuation=True,
                            prefix_cache=False, raw_prompt=True, exact_prompt_tokens=True)

    async def prompt_tokens(self, prompt: Prompt) -> int:
        if prompt.is_chat:
            words = sum(len(m.content.split()) + self.overhead for m in prompt.messages)
        else:
            words = len((prompt.text or "").split())
        return words + len(prompt.assistant_prefix.split())

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        call_index = len(self.calls)
        self.calls.append(ScriptedCall(prompt, params, deadline))
        started = time.monotonic()
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        samples = []
        for i in range(params.n):
            reply = self._reply(prompt, params, call_index, i)
            if reply.error is not None:
                raise reply.error
            samples.append(_sample(reply, params))
        p = await self.prompt_tokens(prompt)
        requests = 1 if self.native_n else len(samples)
        usage = Usage(
            generations=len(samples),
            input_tokens=p * requests,
            output_tokens=sum(s.output_tokens for s in samples),
            cached_input_tokens=min(self.cached_prompt_tokens, p) * requests,
        )
        return Completion(tuple(samples), usage, self.model, time.monotonic() - started)

    async def aclose(self) -> None:
        return None

    def _reply(self, prompt: Prompt, params: SamplingParams, call: int, i: int) -> Reply:
        if callable(self.replies):
            out = self.replies(prompt, params, call, i)
        else:
            if not self.replies:
                raise BackendError("scripted backend has no replies")
            out = self.replies[next(self._counter) % len(self.replies)]
        return Reply(out) if isinstance(out, str) else out


def _sample(reply: Reply, params: SamplingParams) -> Sample:
    thought = _cut(reply.reasoning, params.max_tokens, params.stop) if reply.reasoning is not None else None
    used = thought[1] if thought else 0
    if thought is not None and (thought[2] or used >= params.max_tokens):
        # generation ended inside the thinking (a stop string, or the token limit): no text
        text, n_text, finish = "", 0, "stop" if thought[2] == "stop" else "length"
    else:
        text, n_text, stopped = _cut(reply.text, params.max_tokens - used, params.stop)
        finish = stopped or "stop"
    n = max(1, n_text + used)  # an empty reply still cost the end-of-sequence token
    logprobs = tuple([reply.logprob] * n) if reply.logprob is not None and params.logprobs else None
    confidences = None
    if params.top_logprobs:
        c = reply.confidence
        confidences = tuple(c[:n]) if isinstance(c, tuple) else (c,) * n
    return Sample(text, finish, n, logprobs, confidences, reasoning=thought[0] if thought else None)


def _cut(text: str, max_tokens: int, stops: tuple[str, ...]) -> tuple[str, int, str | None]:
    """``text`` cut at the first stop string and at ``max_tokens`` words: (text, words, "stop"
    or "length" where it was cut, else None)."""
    cut = None
    for stop in stops:
        if stop in text:
            text, cut = text[: text.index(stop)], "stop"
    words = text.split()
    if len(words) > max_tokens:
        words, cut = words[:max_tokens], "length"
        text = " ".join(words)
    return text, len(words), cut
