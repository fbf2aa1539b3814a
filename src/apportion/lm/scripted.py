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
    """A scripted reply; ``logprobs`` default to -0.1 per token, or one value for all tokens."""

    text: str
    logprob: float | None = -0.1
    error: BackendError | None = None


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
        usage = Usage(
            generations=len(samples),
            input_tokens=p if self.native_n else p * len(samples),
            output_tokens=sum(s.output_tokens for s in samples),
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
    text, finish = reply.text, "stop"
    for stop in params.stop:
        if stop in text:
            text = text[: text.index(stop)]
    words = text.split()
    if len(words) > params.max_tokens:
        words, finish = words[: params.max_tokens], "length"
        text = " ".join(words)
    n = max(1, len(words))  # an empty reply still cost the end-of-sequence token
    logprobs = tuple([reply.logprob] * n) if reply.logprob is not None and params.logprobs else None
    return Sample(text, finish, n, logprobs)
