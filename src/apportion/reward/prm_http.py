"""A process reward model served over HTTP by vLLM's pooling API, the way Qwen2.5-Math-PRM is.

Serving (vLLM; ``--task reward`` in older releases, ``--runner pooling`` in newer ones)::

    vllm serve Qwen/Qwen2.5-Math-PRM-7B --task reward

The published format this client follows:

- Request (vLLM's Pooling API, ``POST {server}/pooling``, at the server's root, not under /v1;
  vLLM's ``examples/online_serving/openai_pooling_client.py`` and
  ``vllm/entrypoints/pooling/pooling/protocol.py``): either ``{"model": M, "input": TEXT}``
  (``input`` may also be a list of texts: one result per text, by ``index``) or
  ``{"model": M, "messages": [...]}``, rendered by the server's chat template.
- Response (``PoolingResponse``)::

      {"object": "list", "model": M,
       "data": [{"index": 0, "object": "pooling", "data": [[p_wrong, p_right], ...]}, ...],
       "usage": {"prompt_tokens": T, "total_tokens": T, "completion_tokens": 0}}

  vLLM serves Qwen2.5-Math-PRM as ``Qwen2ForProcessRewardModel`` with the STEP pooler: softmax
  over two labels, kept only at the step tag token ``<extra_0>`` (id 151651), so there is one
  probability pair per separator, and the step's reward is the "right" (positive) probability.
- Input (the model card of Qwen/Qwen2.5-Math-PRM-7B): a chat of the system prompt "Please reason
  step by step, and put your final answer within \\boxed{}.", the question as the user turn, and
  the assistant turn holding the steps joined by ``<extra_0>`` with a trailing ``<extra_0>``; the
  card renders it with the tokenizer's chat template (Qwen2.5's ChatML), generation prompt off.

Batching: with ``request_format="input"`` (the default) the paths of one search step go in one
request (``input`` a list of texts, at most ``max_paths_per_request`` each), rendered here as
ChatML exactly as the chat template renders them; ``"messages"`` sends one request per path and
lets the server render it. A path is scored in one forward pass whatever its length: the pass
rates every prefix of it (a causal model's score at a separator depends only on what precedes
it), so the cache keeps them all, and a path that is a prefix of another in the same call is not
sent apart.

Cost: every request is one "scorer" call in the ledger (``budget/metered_call.py``): reserved at
an upper bound of its input tokens (the UTF-8 bytes of the text plus a few per message; byte-level
BPE never takes more tokens than bytes), settled with the reported ``usage.prompt_tokens`` (or
the bound, marked estimated, when the reply has none), its latency recorded; priced at
``input_price_per_mtok`` dollars per million input tokens; no output tokens; one scorer
generation per path sent.

Errors never become scores: an HTTP error, a body that is not the format above, a number of
pairs other than the number of steps, a probability outside [0, 1], or no reply within
``timeout_s`` fails the paths concerned (``ProcessScoringFailed``, with everything else kept).
429, 5xx and refused connections are retried (they cost nothing); the rest are not.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from apportion.budget.ledger import Ask, Grant, Ledger
from apportion.budget.metered_call import Metered, metered_call
from apportion.budget.units import Price, Usage
from apportion.errors import (
    BackendError,
    BackendRequestError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    ModelNotFound,
)
from apportion.lm._loop import LoopLocal
from apportion.lm.metered import MeteredLM
from apportion.reward.process import PrefixOutcome, PrefixScoreCache, Steps, score_paths

QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_PRM_SEPARATOR = "<extra_0>"
REQUEST_FORMATS = ("input", "messages")
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError, httpx.WriteTimeout,
           httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.ProxyError)
_PER_MESSAGE_TOKENS = 8  # <|im_start|>, the role, newlines, <|im_end|>: a generous bound
_PER_TEXT_TOKENS = 8


@dataclass(frozen=True, slots=True)
class PRMOptions:
    base_url: str
    """The server's root (``http://host:8000``); a trailing ``/v1`` is dropped, since vLLM serves
    ``/pooling`` at the root."""
    model: str
    api_key: str | None = None
    request_format: str = "input"
    """"input": the paths of a call in one request, rendered here as ChatML; "messages": one
    request per path, rendered by the server's chat template."""
    step_separator: str = QWEN_PRM_SEPARATOR
    system_prompt: str | None = QWEN_PRM_SYSTEM
    positive_index: int = 1
    """Which entry of each pair is the probability that the step is right."""
    strip_steps: bool = True
    """Steps are stripped of surrounding white space, as the model card's steps are (split on blank lines)."""
    input_price_per_mtok: float = 0.0
    timeout_s: float = 60.0
    """Longest wait for a whole reply; a run's deadline shortens it."""
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    """Retries of failures that cost nothing (429, 5xx, refused connections)."""
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_concurrency: int = 8
    """Requests in flight at once (connections)."""
    max_paths_per_request: int = 32

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"PRM base URL must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("a PRM client needs the served model's name")
        if self.request_format not in REQUEST_FORMATS:
            raise ConfigError(f"request_format must be one of {REQUEST_FORMATS}, got {self.request_format!r}")
        if not self.step_separator:
            raise ConfigError("the step separator must not be empty")
        if self.positive_index < 0:
            raise ConfigError(f"positive_index must be >= 0, got {self.positive_index}")
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise ConfigError("PRM timeouts must be > 0 seconds")
        if self.max_retries < 0 or self.max_concurrency < 1 or self.max_paths_per_request < 1:
            raise ConfigError("max_retries >= 0, max_concurrency >= 1 and max_paths_per_request >= 1 are required")
        if not (self.input_price_per_mtok >= 0 and math.isfinite(self.input_price_per_mtok)):
            raise ConfigError(f"input_price_per_mtok must be >= 0, got {self.input_price_per_mtok}")

    @property
    def price(self) -> Price:
        return Price(input_per_mtok=self.input_price_per_mtok, output_per_mtok=0.0)


@dataclass(frozen=True, slots=True)
class _Request:
    """One text (or chat) to score and the steps it holds."""

    steps: Steps
    text: str
    messages: tuple[dict[str, str], ...]
    bound: int


class PRMClient:
    """A ``ProcessScorer`` over a process reward model served by vLLM's /pooling (see the module)."""

    name = "prm"

    def __init__(self, options: PRMOptions, cache: PrefixScoreCache | None = None) -> None:
        self.options = options
        base = options.base_url.rstrip("/")
        self._base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.url = f"{self._base}/pooling"
        self.cache = cache if cache is not None else PrefixScoreCache()
        self._clients: LoopLocal[httpx.AsyncClient] = LoopLocal(self._make_client)
        self._limits: LoopLocal[asyncio.Semaphore] = LoopLocal(lambda: asyncio.Semaphore(options.max_concurrency))

    async def score(self, lm: MeteredLM, question: str,
                    paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        async def score_new(prefixes: list[Steps]) -> Mapping[Steps, PrefixOutcome]:
            return await self._score_prefixes(lm.ledger, question, prefixes)

        return await score_paths(self.cache, question, paths, score_new, scorer=f"PRM {self.options.model}")

    async def aclose(self) -> None:
        client = self._clients.pop_current()
        if client is not None:
            await client.aclose()

    # -- requests ------------------------------------------------------------------------------

    def render(self, question: str, steps: Sequence[str]) -> str:
        """The text the model reads for ``steps``: the chat as Qwen2.5's chat template renders it
        (ChatML, no generation prompt), the steps joined by the separator, one after the last."""
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in self.messages(question, steps))

    def messages(self, question: str, steps: Sequence[str]) -> tuple[dict[str, str], ...]:
        o = self.options
        sep = o.step_separator
        # A separator inside a step would add a score nobody asked for: it is taken out of the text.
        clean = [(s.strip() if o.strip_steps else s).replace(sep, "") for s in steps]
        system = ({"role": "system", "content": o.system_prompt},) if o.system_prompt else ()
        return (*system, {"role": "user", "content": question},
                {"role": "assistant", "content": sep.join(clean) + sep})

    def _request(self, question: str, steps: Steps) -> _Request:
        messages = self.messages(question, steps)
        text = self.render(question, steps) if self.options.request_format == "input" else ""
        if text:
            bound = len(text.encode()) + _PER_TEXT_TOKENS
        else:
            bound = sum(len(m["content"].encode()) + _PER_MESSAGE_TOKENS for m in messages) + _PER_TEXT_TOKENS
        return _Request(steps, text, messages, bound)

    async def _score_prefixes(self, ledger: Ledger, question: str,
                              prefixes: list[Steps]) -> dict[Steps, PrefixOutcome]:
        """Every prefix in ``prefixes`` scored by sending only the longest ones (every other is a
        prefix of one of them), in as few requests as the format allows, concurrently."""
        longer = {p[:k] for p in prefixes for k in range(1, len(p))}
        sent = [self._request(question, p) for p in prefixes if p not in longer]
        per = 1 if self.options.request_format == "messages" else self.options.max_paths_per_request
        chunks = [sent[i:i + per] for i in range(0, len(sent), per)]
        results = await asyncio.gather(*(self._charged(ledger, chunk) for chunk in chunks), return_exceptions=True)
        out: dict[Steps, PrefixOutcome] = {}
        for chunk, result in zip(chunks, results):
            for i, req in enumerate(chunk):
                outcome: Sequence[float] | BaseException = (
                    result if isinstance(result, BaseException) else result[i])
                for k in range(1, len(req.steps) + 1):
                    out[req.steps[:k]] = outcome if isinstance(outcome, BaseException) else outcome[k - 1]
        for result in results:  # cancellation and bugs are not failures to record
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
        return out

    async def _charged(self, ledger: Ledger, chunk: list[_Request]) -> list[Sequence[float] | BaseException]:
        ask = Ask.input_only(sum(r.bound for r in chunk), n=len(chunk), price=self.options.price)

        async def call(grant: Grant) -> Metered[list[Sequence[float] | BaseException]]:
            return await self._post_chunk(chunk, ledger.deadline())

        return await metered_call(ledger, ask, call, model=self.options.model)

    async def _post_chunk(self, chunk: list[_Request], deadline: float | None
                          ) -> Metered[list[Sequence[float] | BaseException]]:
        o = self.options
        body: dict[str, Any] = {"model": o.model}
        if o.request_format == "messages":
            body["messages"] = list(chunk[0].messages)
            body["add_generation_prompt"] = False
        else:
            body["input"] = [r.text for r in chunk] if len(chunk) > 1 else chunk[0].text
        data, failures = await self._post(body, deadline)
        bound = sum(r.bound for r in chunk)
        usage, notes = _usage(data, bound, len(chunk))
        try:
            rows = self._rows(data, len(chunk))
        except BackendError as exc:  # charged what the reply says it cost, where it says
            exc.consumed = None if usage.estimated else replace(usage, generations=0)
            raise
        outcomes: list[Sequence[float] | BaseException] = []
        for req, row in zip(chunk, rows):
            try:
                outcomes.append(self._step_scores(row, len(req.steps)))
            except BackendError as exc:
                outcomes.append(exc)
        if failures:
            notes = (*notes, f"{len(failures)} failed attempt(s) retried: " + "; ".join(failures[:5]))
        return Metered(outcomes, usage, notes)

    def _rows(self, data: dict[str, Any], count: int) -> list[Any]:
        """Each text's ``data``, by ``index``; the whole reply is refused (billed) when it does not
        hold exactly one well-formed item per text sent."""
        items = data.get("data")
        bad = BackendError  # a 200 the server computed and we cannot read: billed
        if not isinstance(items, list):
            raise bad(f"{self.url} answered 200 without a data list", billed=True)
        rows: dict[int, Any] = {}
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count or index in rows:
                raise bad(f"{self.url} answered 200 with a bad item {json.dumps(item)[:120]}", billed=True)
            rows[index] = item.get("data")
        if len(rows) != count:
            raise bad(f"{self.url} answered {len(rows)} results for {count} texts", billed=True)
        return [rows[i] for i in range(count)]

    def _step_scores(self, row: Any, n_steps: int) -> list[float]:
        o = self.options
        if not isinstance(row, list) or any(not isinstance(pair, list) for pair in row):
            raise BackendError(f"{self.url}: expected one probability pair per step, got {json.dumps(row)[:120]}",
                               billed=True)
        if len(row) != n_steps:
            raise BackendError(
                f"{self.url}: {len(row)} scores for {n_steps} steps (one per {o.step_separator!r} expected); "
                "is the model served with the STEP pooler and its step tag token (vLLM's step_tag_id)?",
                billed=True)
        scores = []
        for pair in row:
            value = pair[o.positive_index] if len(pair) > o.positive_index else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise BackendError(f"{self.url}: {json.dumps(pair)[:80]} is not a probability pair "
                                   "(is the server's softmax off?)", billed=True)
            scores.append(float(value))
        return scores

    # -- HTTP ----------------------------------------------------------------------------------

    def _make_client(self) -> httpx.AsyncClient:
        o = self.options
        limits = httpx.Limits(max_connections=o.max_concurrency, max_keepalive_connections=o.max_concurrency)
        return httpx.AsyncClient(timeout=httpx.Timeout(o.timeout_s, connect=o.connect_timeout_s), limits=limits)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        return headers

    async def _post(self, body: dict[str, Any], deadline: float | None) -> tuple[dict[str, Any], list[str]]:
        """The reply's JSON body and the failures retried before it. Retries what cost nothing;
        raises what may have cost something (billed) and what retrying cannot cure."""
        o = self.options
        failures: list[str] = []
        for attempt in range(o.max_retries + 1):
            outcome = await self._attempt(body, deadline)
            if isinstance(outcome, dict):
                return outcome, failures
            failures.append(outcome)
            if attempt == o.max_retries:
                break
            delay = min(o.max_backoff_s, o.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            if deadline is not None and time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        raise BackendUnavailable(f"{self.url} failed after {len(failures)} attempt(s): {failures[-1]}")

    async def _attempt(self, body: dict[str, Any], deadline: float | None) -> dict[str, Any] | str:
        o = self.options
        wait = o.timeout_s
        if deadline is not None:
            wait = max(1e-3, min(wait, deadline - time.monotonic()))
        async with self._limits.get():
            try:
                async with asyncio.timeout(wait + o.connect_timeout_s):  # a reply dripped a byte at a time
                    response = await self._clients.get().post(
                        self.url, json=body, headers=self._headers(),
                        timeout=httpx.Timeout(wait, connect=min(wait, o.connect_timeout_s)))
            except _UNSENT as exc:
                return f"{type(exc).__name__}: {exc}"
            except (TimeoutError, httpx.TimeoutException):
                raise BackendTimeout(f"{self.url} sent no complete reply within {wait:g} s", billed=True) from None
            except httpx.HTTPError as exc:
                raise BackendUnavailable(f"{self.url}: reply cut off ({type(exc).__name__}: {exc})",
                                         billed=True) from None
        if response.status_code != 200:
            if response.status_code in _RETRY_STATUS:
                return f"HTTP {response.status_code}"
            detail = response.text[:300]
            if response.status_code == 404:
                raise ModelNotFound(f"{self.url}: HTTP 404 ({detail}); is this a vLLM server with the pooling "
                                    f"API, serving {o.model!r}?")
            raise BackendRequestError(f"{self.url} rejected the request: HTTP {response.status_code}: {detail}",
                                      response.status_code)
        try:
            data = response.json()
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise BackendError(f"{self.url} answered 200 with a malformed body: {response.content[:120]!r}",
                               billed=True)
        return data


def _usage(data: dict[str, Any], bound: int, texts: int) -> tuple[Usage, tuple[str, ...]]:
    """The reported prompt tokens, or ``bound`` marked estimated where the reply has none."""
    usage = data.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        return (Usage(generations=texts, input_tokens=bound, estimated=True),
                ("the reply reported no usage: charged the input bound, marked estimated",))
    return Usage(generations=texts, input_tokens=tokens), ()
