"""The one async protocol every backend speaks, and the values that cross it."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, runtime_checkable

from apportion.budget.units import Price, Usage
from apportion.errors import BackendError, ConfigError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"message role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ConfigError(f"message content must be a string, got {type(self.content).__name__}")


@dataclass(frozen=True, slots=True)
class Prompt:
    """Chat messages or raw text, plus an optional partial assistant message to continue.

    Continuation is what step-wise search and budget forcing build on: the model resumes the
    assistant turn after ``assistant_prefix`` instead of starting a new one. Sample texts never
    repeat the prefix.
    """

    messages: tuple[Message, ...] = ()
    text: str | None = None
    assistant_prefix: str = ""

    def __post_init__(self) -> None:
        if (self.text is None) == (not self.messages):
            raise ConfigError("a prompt is either chat messages or raw text, not both and not neither")
        if self.messages and self.messages[-1].role == "assistant":
            raise ConfigError("put a partial assistant message in assistant_prefix, not in messages")

    @classmethod
    def chat(cls, user: str, system: str | None = None) -> Prompt:
        messages = (Message("system", system),) if system else ()
        return cls(messages=(*messages, Message("user", user)))

    @classmethod
    def raw(cls, text: str) -> Prompt:
        return cls(text=text)

    def continued(self, prefix: str) -> Prompt:
        return Prompt(self.messages, self.text, self.assistant_prefix + prefix)

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def content_bytes(self) -> int:
        parts = [m.content for m in self.messages] if self.is_chat else [self.text or ""]
        return sum(len(p.encode()) for p in parts) + len(self.assistant_prefix.encode())

    def key(self) -> str:
        """Stable identity, for caches keyed by prompt."""
        return _prompt_key(self)

    def to_dict(self) -> dict[str, object]:
        if self.is_chat:
            out: dict[str, object] = {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        else:
            out = {"text": self.text}
        if self.assistant_prefix:
            out["assistant_prefix"] = self.assistant_prefix
        return out


@lru_cache(maxsize=1024)
def _prompt_key(prompt: Prompt) -> str:
    """``Prompt.key``, worked out once per prompt while it is in use (a request asks for it
    several times: its token bound, what the server reported for it)."""
    payload = json.dumps(
        [[(m.role, m.content) for m in prompt.messages], prompt.text, prompt.assistant_prefix]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Partial:
    """A sample while it is decoded, as ``SamplingParams.cut`` sees it after each token: the
    lists grow in place (a predicate reads, never keeps them). ``text`` may lag a multi-byte
    character."""

    text: str
    logprobs: Sequence[float]
    confidences: Sequence[float]


Cut = Callable[[Partial], bool]
"""A per-sequence stop predicate: True ends that sample now (finish_reason "cut"); the others go on."""


def cut_point(sample: Sample, cut: Cut) -> int | None:
    """The token count at which ``cut`` would have ended a finished sample (None: never), for
    sources that cannot stop mid-decode. The predicate sees the sample's log-probabilities and
    confidences token by token, but no text (which is not known per token here)."""
    logprobs, confidences = sample.logprobs or (), sample.confidences or ()
    seen_lp: list[float] = []
    seen_conf: list[float] = []
    view = Partial("", seen_lp, seen_conf)
    for i in range(max(len(logprobs), len(confidences))):
        if i < len(logprobs):
            seen_lp.append(logprobs[i])
        if i < len(confidences):
            seen_conf.append(confidences[i])
        if i + 1 < sample.output_tokens and cut(view):
            return i + 1
    return None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample, for one request of ``n`` samples."""

    n: int = 1
    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    """Keep DeepConf's token confidence over this many most probable tokens per token (0: none);
    see ``Sample.confidences``."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence up to max_tokens (for fixed-length benchmarks)."""
    cut: Cut | None = field(default=None, compare=False)
    """Asked after every token of every sample. Backends that decode locally (``capabilities.cut``)
    stop the sample there and charge its tokens so far; over HTTP without streaming the whole
    sample is drawn and paid for, and the cut is applied to it afterwards (``MeteredLM``)."""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n must be an integer >= 1, got {self.n!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 5):
            raise ConfigError(f"temperature must be in [0, 5], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if isinstance(self.top_logprobs, bool) or not isinstance(self.top_logprobs, int) \
                or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


FINISH_REASONS = ("stop", "length", "deadline", "cut")
MAX_TOP_LOGPROBS = 20
"""OpenAI's limit on ``top_logprobs``."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled continuation. ``logprobs`` are the log-probabilities, under the model's own
    (temperature 1) distribution, of the tokens that were sampled; None where unavailable.
    ``confidences`` are per-token confidences (Fu et al. 2025): minus the mean log-probability of
    the ``top_logprobs`` most probable tokens at each position; None where not asked for or not
    given. ``finish_reason`` "cut" is a sample its ``SamplingParams.cut`` ended mid-decode.
    ``reasoning`` is the thinking a reasoning server returns apart from the text (vLLM's
    ``reasoning_content``): generated and counted in ``output_tokens``, not part of ``text``;
    None where the server sent none."""

    text: str
    finish_reason: str
    output_tokens: int
    logprobs: tuple[float, ...] | None = None
    confidences: tuple[float, ...] | None = None
    reasoning: str | None = None

    @property
    def mean_logprob(self) -> float | None:
        if not self.logprobs:
            return None
        return math.fsum(self.logprobs) / len(self.logprobs)


@dataclass(frozen=True, slots=True)
class Completion:
    """What one call returned; ``usage`` is what it consumed, ``notes`` say what the backend had
    to work around (a server that ignored n, missing usage, retried attempts). ``error`` is set
    where a failure cut the call short after some samples were drawn (they are kept)."""

    samples: tuple[Sample, ...]
    usage: Usage
    model: str
    latency_s: float
    notes: tuple[str, ...] = ()
    error: BackendError | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Declared, not guessed; an HTTP backend revises ``native_n`` as it sees the server."""

    native_n: bool = False
    """A request for n samples returns them all (and pays for the prompt once). Where False, the
    metered layer asks for one sample per request instead."""
    logprobs: bool = False
    continuation: bool = False
    prefix_cache: bool = False
    raw_prompt: bool = True
    exact_prompt_tokens: bool = False
    """prompt_tokens() is exact rather than an upper bound."""
    cut: bool = False
    """``SamplingParams.cut`` stops a sample mid-decode (saving its remaining tokens)."""


@runtime_checkable
class Backend(Protocol):
    """A source of samples. Implementations: embedded llama.cpp, OpenAI-compatible HTTP, scripted."""

    @property
    def model(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def price(self) -> Price: ...

    async def prompt_tokens(self, prompt: Prompt) -> int:
        """Tokens the prompt costs in one request: exact where the backend can tokenize,
        otherwise an upper bound (so that reservations stay on the safe side)."""
        ...

    async def generate(
        self, prompt: Prompt, params: SamplingParams, *, deadline: float | None = None
    ) -> Completion:
        """One request for ``params.n`` continuations. ``deadline`` (time.monotonic) ends generation
        early: backends that can stop mid-sample return what they have with finish_reason "deadline".

        Returns what the request got: fewer samples than ``n`` where the source gave fewer (the
        caller decides whether to ask again, through the ledger), never more. ``usage`` is what the
        request consumed, including anything the backend dropped. A failure raises BackendError
        saying whether the request may have been billed (see ``BackendError``); a backend retries
        on its own only failures that cost nothing."""
        ...

    async def aclose(self) -> None: ...
