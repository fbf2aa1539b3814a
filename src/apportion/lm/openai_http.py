"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, OpenAI) over HTTP.

One ``generate`` is one request (the metered layer asks again, through the ledger, for whatever
a reply left out). Servers lie, so what comes back is checked, not trusted:
- ``n`` is sent in one request unless the server has shown, several replies in a row, that it
  ignores it (``n_support``); fewer choices than asked come back as fewer samples, more are cut
  to ``n`` with all their tokens charged (the server generated them) and a note.
- Usage is taken from the reply; where it is missing it is bounded from above (``http_reply``)
  and marked estimated, never taken as zero.
- Failures that cost nothing (429, 5xx, a refused connection) are retried here with exponential
  backoff, honouring Retry-After. Failures after the server took the request (no reply in time,
  a reply cut off, a 200 without usable choices) may have been billed: they are raised with what
  they cost, or with the cost unknown, for the ledger to charge, and retried by the caller.
- Other 4xx are not retried, and the server's message is surfaced.
- Requests run concurrently on at most ``max_concurrency`` connections (a server that batches,
  such as vLLM, SGLang or llama.cpp's with several slots, decodes them together); the rest wait
  for a free one without being sent.
- ``prefix_order``: a request whose prompt shares a long prefix (``prefix_share_min_chars``) with
  one just sent is held until that one completes or has been on the wire ``prefix_hold_s``, so
  that the server's prefix cache (vLLM's automatic prefix caching, SGLang's radix cache,
  llama.cpp's ``cache_prompt``) has computed the prefix before the followers arrive instead of
  every one of them prefilling it at once (``lm/prefix_order.py``). Prompts that share nothing
  are never held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from apportion.budget.units import Price, Usage
from apportion.errors import (
    BackendError,
    BackendRequestError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    DeadlineReached,
    ModelNotFound,
)
from apportion.lm._loop import LoopLocal
from apportion.lm.base import Capabilities, Completion, Prompt, SamplingParams
from apportion.lm.http_reply import read_reply
from apportion.lm.n_support import NSupport
from apportion.lm.prefix_order import DEFAULT_HOLD_S, DEFAULT_MIN_CHARS, PrefixOrder, Ticket, server_view

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Failures before the request could reach the server: nothing was generated, so nothing is billed.
_UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError, httpx.WriteTimeout,
           httpx.LocalProtocolError, httpx.UnsupportedProtocol, httpx.ProxyError)
# Bytes per token is at least 1 for byte-level BPE; chat templates add a few special tokens
# per message and sometimes a default system prompt. Raised when the server shows more.
_DEFAULT_OVERHEAD = 64
CONTINUATION_MODES = ("server", "chatml", "none")
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class HTTPOptions:
    base_url: str
    model: str
    api_key: str | None = None
    price: Price = field(default_factory=Price)
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Longest wait for a whole reply to one request (a non-streamed reply arrives only when
    generation is done, so this bounds generation too). A deadline budget shortens it."""
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    max_retries: int = 4
    """Retries of failures that cost nothing (429, 5xx, refused connections)."""
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_concurrency: int = 16
    """Requests in flight at once (connections); more wait for a free one, unsent."""
    prefix_order: bool = True
    """Hold a request whose prompt shares ``prefix_share_min_chars`` or more with one just sent
    until that one completes or has been sent ``prefix_hold_s`` ago, so that server prefix caches
    hit (``lm/prefix_order.py``)."""
    prefix_share_min_chars: int = DEFAULT_MIN_CHARS
    """Shortest shared prefix worth a hold, in characters of the messages as sent (role, content,
    in order, then the assistant prefix)."""
    prefix_hold_s: float = DEFAULT_HOLD_S
    """Longest hold after the leader was sent: about the time a batching server takes to prefill
    a shared prefix of a few thousand tokens."""
    native_n: bool | None = None
    """None: decide from the server's replies (``n_support``); True/False: trust this."""
    logprobs: bool | None = None
    """None: ask for logprobs and find out whether the server returns them."""
    continuation: str = "server"
    """How to continue a partial assistant message: "server" sends vLLM/SGLang's
    ``continue_final_message``; "chatml" renders the chat as ChatML here and continues it through
    /completions (for servers that ignore that flag, such as llama-cpp-python's, serving a ChatML
    model); "none" refuses."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("an HTTP backend needs a model name (--model)")
        if self.continuation not in CONTINUATION_MODES:
            raise ConfigError(f"continuation must be one of {CONTINUATION_MODES}, got {self.continuation!r}")
        if self.max_retries < 0 or self.max_concurrency < 1:
            raise ConfigError("max_retries >= 0 and max_concurrency >= 1 are required")
        if self.prefix_share_min_chars < 1 or not 0 <= self.prefix_hold_s < float("inf"):
            raise ConfigError(f"prefix_share_min_chars >= 1 and 0 <= prefix_hold_s < inf are required, got "
                              f"{self.prefix_share_min_chars} and {self.prefix_hold_s}")
        if not (self.timeout_s > 0 and self.connect_timeout_s > 0):
            raise ConfigError(f"timeouts must be > 0 seconds, got {self.connect_timeout_s} (connect) and "
                              f"{self.timeout_s} (reply)")


class OpenAIHTTPBackend:
    """``generate`` is one request, sent on one of ``max_concurrency`` connections; concurrent
    calls are in flight together (a batching server decodes them together). With
    ``prefix_order`` (the default) a call whose prompt shares ``prefix_share_min_chars`` or more
    with a request sent less than ``prefix_hold_s`` ago, still running, waits for it first, so
    that it reads the shared prefix from the server's cache (``lm/prefix_order.py``)."""

    def __init__(self, options: HTTPOptions) -> None:
        self.options = options
        self._base = options.base_url.rstrip("/")
        self._n = NSupport(options.native_n)
        self._logprobs = options.logprobs
        self._prompt_cache: dict[str, int] = {}
        self._overhead = _DEFAULT_OVERHEAD
        self._connected = False
        self._clients: LoopLocal[httpx.AsyncClient] = LoopLocal(self._make_client)
        self._limits: LoopLocal[asyncio.Semaphore] = LoopLocal(
            lambda: asyncio.Semaphore(options.max_concurrency))
        self._orders: LoopLocal[PrefixOrder] = LoopLocal(
            lambda: PrefixOrder(min_chars=options.prefix_share_min_chars, hold_s=options.prefix_hold_s))

    # -- protocol ------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        return self.options.model

    @property
    def name(self) -> str:
        return f"openai-http {self._base}"

    @property
    def price(self) -> Price:
        return self.options.price

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            native_n=self._n.batches,
            logprobs=self._logprobs is not False,
            continuation=self.options.continuation != "none",
            prefix_cache=False,
            raw_prompt=True,
            exact_prompt_tokens=False,
        )

    async def prompt_tokens(self, prompt: Prompt) -> int:
        return self._prompt_estimate(prompt)

    def _prompt_estimate(self, prompt: Prompt) -> int:
        """Exact once the server has reported this prompt's tokens; an upper bound before."""
        known = self._prompt_cache.get(prompt.key())
        return known if known is not None else self._prompt_bound(prompt)

    def _prompt_bound(self, prompt: Prompt) -> int:
        return prompt.content_bytes() + self._overhead + 8 * len(prompt.messages)

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        started = time.monotonic()
        failures: list[str] = []
        path, body = self._payload(prompt, params)
        prompt_bound = self._prompt_estimate(prompt)
        if self.options.prefix_order:
            async with self._orders.get().admit(server_view(prompt), deadline) as ticket:
                data = await self._post(path, body, deadline, failures, ticket)
        else:
            data = await self._post(path, body, deadline, failures)
        try:
            reply = read_reply(data, params, prompt_bound)
        except (ArithmeticError, RecursionError, TypeError, ValueError) as exc:  # absurd values in a well-formed body
            raise BackendError(f"{self._base}{path} answered 200 with a body that cannot be read: "
                               f"{type(exc).__name__}: {str(exc)[:120]}", billed=True, retryable=True) from None
        notes = list(reply.notes)
        if params.logprobs and self._logprobs is None and reply.samples:
            self._logprobs = any(s.logprobs is not None for s in reply.samples)
        changed = self._n.observe(params.n, len(reply.samples))
        if changed:
            notes.append(changed)
        if not reply.samples:
            raise BackendError(f"{self._base}{path} answered 200 with no choices", billed=True,
                               consumed=None if reply.usage.estimated else replace(reply.usage, generations=0),
                               retryable=True)
        self._learn_prompt(prompt, reply.usage)
        samples = reply.samples
        if len(samples) > params.n:
            notes.append(f"server returned {len(samples)} choices for n={params.n}: kept the first {params.n}, "
                         "charged the tokens of all (the server generated them)")
            samples = samples[: params.n]
        elif len(samples) < params.n:
            notes.append(f"server returned {len(samples)} of n={params.n} choices")
        if failures:
            notes.append(f"{len(failures)} failed attempt(s) retried: " + "; ".join(failures[:5]))
        usage = replace(reply.usage, generations=len(samples))
        return Completion(samples, usage, self.model, time.monotonic() - started, tuple(notes))

    async def aclose(self) -> None:
        client = self._clients.pop_current()
        if client is not None:
            await client.aclose()

    # -- preflight -----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """Fail fast and clearly: is the server up, is this the API's address, does it serve this
        model? Returns the served model names (empty where the server does not list them)."""
        o = self.options
        try:
            async with asyncio.timeout(o.connect_timeout_s + o.timeout_s):  # a reply dripped a byte at a time
                response = await self._client().get(f"{self._base}/models", headers=self._headers())
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"cannot reach {self._base}: {_describe(exc)}") from None
        except TimeoutError:
            raise BackendUnavailable(f"{self._base}/models sent no complete reply within "
                                     f"{o.connect_timeout_s + o.timeout_s:g} s") from None
        self._connected = True
        if response.status_code in (401, 403):
            raise BackendRequestError(
                f"{self._base} refused the API key (HTTP {response.status_code})", response.status_code)
        if response.status_code == 404 and _path_hint(self._base):
            raise ModelNotFound(f"{self._base}/models: HTTP 404; {_path_hint(self._base)}")
        if response.status_code != 200:
            return []
        try:
            served = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError):
            return []
        if served and self.model not in served:
            raise ModelNotFound(f"model {self.model!r} is not served at {self._base}; it serves: "
                                + ", ".join(served[:20]))
        return served

    # -- internals -----------------------------------------------------------------------------

    def _make_client(self) -> httpx.AsyncClient:
        o = self.options
        timeout = httpx.Timeout(o.timeout_s, connect=o.connect_timeout_s)
        limits = httpx.Limits(max_connections=o.max_concurrency, max_keepalive_connections=o.max_concurrency)
        return httpx.AsyncClient(timeout=timeout, limits=limits)

    def _client(self) -> httpx.AsyncClient:
        return self._clients.get()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.options.headers}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        return headers

    def _learn_prompt(self, prompt: Prompt, usage: Usage) -> None:
        if usage.estimated:
            return
        key = prompt.key()
        if key not in self._prompt_cache:
            self._prompt_cache[key] = usage.input_tokens
            bound = self._prompt_bound(prompt)
            if usage.input_tokens > bound:
                self._overhead += usage.input_tokens - bound + 16

    def _payload(self, prompt: Prompt, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "stream": False,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True  # vLLM / SGLang extension
        want_logprobs = params.logprobs and self._logprobs is not False
        mode = self.options.continuation
        if prompt.assistant_prefix and prompt.is_chat and mode == "none":
            raise ConfigError(f"{self.name} is set not to continue partial assistant messages")
        if prompt.is_chat and not (prompt.assistant_prefix and mode == "chatml"):
            messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
            if prompt.assistant_prefix:
                messages.append({"role": "assistant", "content": prompt.assistant_prefix})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
            if want_logprobs or params.top_logprobs:
                # top_logprobs >= 1: some servers (llama-cpp-python) return none without it
                body["logprobs"] = True
                body["top_logprobs"] = max(1, params.top_logprobs)
            path = "/chat/completions"
        else:
            text = render_chatml(prompt) if prompt.is_chat else (prompt.text or "")
            body["prompt"] = text + prompt.assistant_prefix
            if want_logprobs or params.top_logprobs:
                body["logprobs"] = max(1, params.top_logprobs)
            path = "/completions"
        body.update(self.options.extra_body)
        return path, body

    @contextlib.asynccontextmanager
    async def _slot(self, url: str, deadline: float | None) -> AsyncIterator[None]:
        """One of ``max_concurrency`` connections; a request still waiting for one when the
        deadline comes was never sent, and says so (it costs nothing)."""
        limit = self._limits.get()
        try:
            async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.monotonic())):
                await limit.acquire()
        except TimeoutError:
            raise DeadlineReached(f"deadline reached while {url} waited for a free connection") from None
        try:
            yield
        finally:
            limit.release()

    async def _post(self, path: str, body: dict[str, Any], deadline: float | None,
                    failures: list[str], ticket: Ticket | None = None) -> dict[str, Any]:
        """The reply's JSON body. Retries what cost nothing; raises what may have cost something."""
        o = self.options
        url = f"{self._base}{path}"
        for attempt in range(o.max_retries + 1):
            try:
                outcome = await self._attempt(url, body, deadline, ticket)
            except BackendError as exc:
                if failures:  # the retried failures before it belong to the story
                    exc.args = (f"{exc} (after {len(failures)} retried: {'; '.join(failures[:5])})",)
                raise
            if isinstance(outcome, dict):
                return outcome
            failure, retry_after = outcome
            failures.append(failure)
            if attempt == o.max_retries:
                break
            delay = min(o.max_backoff_s, o.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(o.max_backoff_s, max(delay, retry_after))
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise DeadlineReached(f"deadline reached before {url} answered ({failure})")
            await asyncio.sleep(delay)
        raise BackendUnavailable(f"{url} failed after {len(failures)} attempt(s): {failures[-1]}")

    async def _attempt(self, url: str, body: dict[str, Any], deadline: float | None,
                       ticket: Ticket | None = None) -> dict[str, Any] | tuple[str, float | None]:
        """One request: the parsed body, or (why, Retry-After) for a failure that cost nothing.
        Failures that may have cost something, and those retrying cannot cure, are raised."""
        o = self.options
        async with self._slot(url, deadline):
            if ticket is not None:
                ticket.sent()  # its prefill starts: the hold of the requests behind it runs from now
            wait, by_deadline = o.timeout_s, False
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineReached(f"deadline reached before {url} was asked")
                wait, by_deadline = min(wait, left), left < wait
            connect = min(wait, o.connect_timeout_s)
            try:
                # The overall bound catches a server that drips bytes slower than any read timeout.
                async with asyncio.timeout(wait if by_deadline else wait + connect):
                    async with self._client().stream(
                            "POST", url, json=body, headers=self._headers(),
                            timeout=httpx.Timeout(wait, connect=connect, write=connect, pool=None)) as response:
                        self._connected = True
                        status = response.status_code
                        if status != 200:
                            raw = await response.aread()
                            if status in _RETRY_STATUS:
                                return f"HTTP {status}", _retry_after(response)
                            raise _request_error(status, raw, url, self._base)
                        raw = await response.aread()
            except _UNSENT as exc:
                if isinstance(exc, httpx.ConnectError) and not self._connected:
                    # Nothing has ever answered: retrying for half a minute would only hide that.
                    raise BackendUnavailable(f"cannot reach {self._base}: {_describe(exc)}") from None
                return _describe(exc), None
            except (TimeoutError, httpx.TimeoutException):
                if by_deadline:
                    raise DeadlineReached(f"deadline reached while waiting for {url}", billed=True) from None
                raise BackendTimeout(f"{url} sent no complete reply within {wait:g} s", billed=True,
                                     retryable=True) from None
            except httpx.HTTPError as exc:  # the server took the request and the reply broke off
                raise BackendUnavailable(f"{url}: reply cut off ({_describe(exc)})", billed=True,
                                         retryable=True) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            data = None
        if not (isinstance(data, dict) and isinstance(data.get("choices"), list)):
            raise BackendError(f"{url} answered 200 with a malformed body: {raw[:120]!r}", billed=True,
                               retryable=True)
        return data


def render_chatml(prompt: Prompt) -> str:
    """The chat in ChatML with an open assistant turn (the prefix is appended by the caller)."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in prompt.messages)
    return turns + "<|im_start|>assistant\n"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _request_error(status: int, raw: bytes, url: str, base: str) -> BackendError:
    detail: Any
    try:
        detail = json.loads(raw)
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    except ValueError:
        detail = raw[:500].decode(errors="replace")
    if status == 404:
        hint = _path_hint(base) or "is the model name right?"
        return ModelNotFound(f"{url}: HTTP 404 ({json.dumps(detail)[:300]}); {hint}")
    return BackendRequestError(f"{url} rejected the request: HTTP {status}: {json.dumps(detail)[:500]}", status)


def _path_hint(base: str) -> str | None:
    """OpenAI-compatible servers serve under /v1; a base URL without it is the usual 404."""
    path = urlsplit(base).path.rstrip("/")
    if path.endswith("/v1") or "/v1/" in path:
        return None
    return f"the API is usually under /v1: try --base-url {base}/v1"


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
