"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, OpenAI) over HTTP.

Servers lie, so what comes back is checked, not trusted:
- ``n`` is sent as one request; a server that returns fewer choices (llama.cpp's ignores ``n``)
  is remembered as not supporting it, the missing samples are made up with concurrent requests
  (each with its own seed, or they would be identical), and later calls go straight to
  concurrent requests.
- Missing usage is estimated (and marked estimated), never taken as zero.
- 429, 5xx, connection errors, timeouts and malformed bodies are retried with exponential
  backoff (honouring Retry-After); other 4xx are not, and their message is surfaced.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from apportion.budget.units import Price, Usage
from apportion.errors import (
    BackendError,
    BackendRequestError,
    BackendUnavailable,
    ConfigError,
    ModelNotFound,
)
from apportion.lm._loop import LoopLocal
from apportion.lm.base import Capabilities, Completion, Prompt, Sample, SamplingParams

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
# Bytes per token is at least 1 for byte-level BPE; chat templates add a few special tokens
# per message and sometimes a default system prompt. Raised when the server shows more.
_DEFAULT_OVERHEAD = 64
CONTINUATION_MODES = ("server", "chatml", "none")


@dataclass(frozen=True, slots=True)
class HTTPOptions:
    base_url: str
    model: str
    api_key: str | None = None
    price: Price = field(default_factory=Price)
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_concurrency: int = 16
    native_n: bool | None = None
    """None: find out from the first request with n > 1."""
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
        if self.max_retries < 0 or self.max_concurrency < 1 or self.timeout_s <= 0:
            raise ConfigError("max_retries >= 0, max_concurrency >= 1 and timeout_s > 0 are required")


@dataclass(slots=True)
class _Attempts:
    """What the retry loop saw, for the call's notes."""

    failures: list[str] = field(default_factory=list)


class OpenAIHTTPBackend:
    def __init__(self, options: HTTPOptions) -> None:
        self.options = options
        self._base = options.base_url.rstrip("/")
        self._native_n = options.native_n
        self._logprobs = options.logprobs
        self._prompt_cache: dict[str, int] = {}
        self._overhead = _DEFAULT_OVERHEAD
        self._connected = False
        self._clients: LoopLocal[httpx.AsyncClient] = LoopLocal(self._make_client)
        self._limits: LoopLocal[asyncio.Semaphore] = LoopLocal(
            lambda: asyncio.Semaphore(options.max_concurrency))

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
            native_n=self._native_n is True,
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
        attempts = _Attempts()
        notes: list[str] = []
        samples: list[Sample] = []
        usage = Usage()
        if params.n == 1 or self._native_n is not False:
            samples, usage = await self._request(prompt, params, deadline, attempts)
            if len(samples) < params.n and self._native_n is not False:
                notes.append(f"server returned {len(samples)} of n={params.n} choices; "
                             "making up the rest with separate requests")
                self._native_n = False
            elif params.n > 1 and self._native_n is None:
                self._native_n = True
        missing = params.n - len(samples)
        if missing > 0:
            more, more_usage, errors = await self._fan_out(prompt, params, missing, deadline, attempts,
                                                           first_index=len(samples))
            samples, usage = samples + more, usage + more_usage
            if errors and not samples:
                raise errors[0]
            if errors:
                notes.append(f"{len(errors)} of {missing} requests failed for good: {errors[0]}")
        if attempts.failures:
            notes.append(f"{len(attempts.failures)} failed attempt(s) retried: "
                         + "; ".join(attempts.failures[:5]))
        if usage.estimated:
            notes.append("server reported no usage: token counts estimated")
        return Completion(tuple(samples), usage, self.model, time.monotonic() - started, tuple(notes))

    async def aclose(self) -> None:
        client = self._clients.pop_current()
        if client is not None:
            await client.aclose()

    # -- preflight -----------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """Fail fast and clearly: is the server up, and does it serve this model? Returns the
        served model names (empty where the server does not list them)."""
        try:
            response = await self._client().get(f"{self._base}/models", headers=self._headers())
        except httpx.HTTPError as exc:
            raise BackendUnavailable(f"cannot reach {self._base}: {_describe(exc)}") from None
        self._connected = True
        if response.status_code in (401, 403):
            raise BackendRequestError(
                f"{self._base} refused the API key (HTTP {response.status_code})", response.status_code)
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

    async def _fan_out(self, prompt: Prompt, params: SamplingParams, count: int,
                       deadline: float | None, attempts: _Attempts,
                       first_index: int) -> tuple[list[Sample], Usage, list[BaseException]]:
        """``count`` single-sample requests at once (bounded by the concurrency limit); what
        succeeded, what it consumed, and the errors of those that failed for good."""

        def one(i: int) -> SamplingParams:
            seed = None if params.seed is None else params.seed + first_index + i
            return replace(params, n=1, seed=seed)

        results = await asyncio.gather(
            *(self._request(prompt, one(i), deadline, attempts) for i in range(count)),
            return_exceptions=True,
        )
        samples: list[Sample] = []
        usage = Usage()
        errors: list[BaseException] = []
        for r in results:
            if isinstance(r, BaseException):
                errors.append(r)
            else:
                samples.extend(r[0])
                usage = usage + r[1]
        return samples, usage, errors

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
            if want_logprobs:
                # top_logprobs=1: some servers (llama-cpp-python) return none without it
                body["logprobs"] = True
                body["top_logprobs"] = 1
            path = "/chat/completions"
        else:
            text = render_chatml(prompt) if prompt.is_chat else (prompt.text or "")
            body["prompt"] = text + prompt.assistant_prefix
            if want_logprobs:
                body["logprobs"] = 1
            path = "/completions"
        body.update(self.options.extra_body)
        return path, body

    async def _request(self, prompt: Prompt, params: SamplingParams, deadline: float | None,
                       attempts: _Attempts) -> tuple[list[Sample], Usage]:
        path, body = self._payload(prompt, params)
        data = await self._post(path, body, deadline, attempts)
        samples, usage = self._parse(data, prompt, params)
        if not usage.estimated:
            key = prompt.key()
            if key not in self._prompt_cache:
                self._prompt_cache[key] = usage.input_tokens
                bound = self._prompt_bound(prompt)
                if usage.input_tokens > bound:
                    self._overhead += usage.input_tokens - bound + 16
        return samples, usage

    async def _post(self, path: str, body: dict[str, Any], deadline: float | None,
                    attempts: _Attempts) -> dict[str, Any]:
        o = self.options
        url = f"{self._base}{path}"
        last_error = "no attempt made"
        for attempt in range(o.max_retries + 1):
            timeout = o.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise BackendUnavailable(f"deadline reached before {url} answered ({last_error})")
            retry_after: float | None = None
            try:
                async with self._limits.get():
                    response = await self._client().post(
                        url, json=body, headers=self._headers(),
                        timeout=httpx.Timeout(timeout, connect=min(timeout, o.connect_timeout_s)))
                self._connected = True
                if response.status_code == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict) and isinstance(data.get("choices"), list) and data["choices"]:
                        return data
                    last_error = "malformed response body"
                elif response.status_code in _RETRY_STATUS:
                    last_error = f"HTTP {response.status_code}"
                    retry_after = _retry_after(response)
                else:
                    raise _request_error(response, url)
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.ConnectError) and not self._connected:
                    # Nothing has ever answered: retrying for half a minute would only hide that.
                    raise BackendUnavailable(f"cannot reach {self._base}: {_describe(exc)}") from None
                last_error = _describe(exc)
            attempts.failures.append(last_error)
            if attempt == o.max_retries:
                break
            delay = min(o.max_backoff_s, o.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = min(o.max_backoff_s, max(delay, retry_after))
            if deadline is not None and time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        raise BackendUnavailable(f"{url} failed after {len(attempts.failures)} attempt(s): {last_error}")

    def _parse(self, data: dict[str, Any], prompt: Prompt,
               params: SamplingParams) -> tuple[list[Sample], Usage]:
        samples: list[Sample] = []
        for choice in sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            if not isinstance(choice, dict):
                continue
            text = _choice_text(choice)
            logprobs = _choice_logprobs(choice)
            if params.logprobs and self._logprobs is None:
                self._logprobs = logprobs is not None
            finish = choice.get("finish_reason") or "stop"
            samples.append(Sample(text, "length" if finish == "length" else "stop",
                                  len(logprobs) if logprobs else 0, logprobs))
        usage_raw = data.get("usage") if isinstance(data.get("usage"), dict) else None
        prompt_tokens = _int(usage_raw, "prompt_tokens")
        completion_tokens = _int(usage_raw, "completion_tokens")
        estimated = prompt_tokens is None or completion_tokens is None
        if prompt_tokens is None:
            prompt_tokens = self._prompt_estimate(prompt)
        if completion_tokens is None:
            completion_tokens = sum(min(params.max_tokens, s.output_tokens or _estimate_tokens(s.text))
                                    for s in samples)
        samples = _spread_tokens(samples, completion_tokens)
        usage = Usage(len(samples), prompt_tokens, completion_tokens, estimated)
        return samples, usage


def render_chatml(prompt: Prompt) -> str:
    """The chat in ChatML with an open assistant turn (the prefix is appended by the caller)."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in prompt.messages)
    return turns + "<|im_start|>assistant\n"


def _choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        return message.get("content") or ""
    return choice.get("text") or ""


def _choice_logprobs(choice: dict[str, Any]) -> tuple[float, ...] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list):  # chat format
        values = [t.get("logprob") for t in content if isinstance(t, dict)]
    else:  # legacy completions format
        values = lp.get("token_logprobs") or []
    clean = tuple(float(v) for v in values if isinstance(v, (int, float)))
    return clean or None


def _spread_tokens(samples: list[Sample], total: int) -> list[Sample]:
    """Per-sample token counts: from logprobs where given, the rest of the reported total shared
    out by text length."""
    known = sum(s.output_tokens for s in samples if s.output_tokens)
    unknown = [s for s in samples if not s.output_tokens]
    if not unknown:
        return samples
    left = max(0, total - known)
    weights = [max(1, len(s.text)) for s in unknown]
    shares = [left * w // sum(weights) for w in weights]
    shares[-1] += left - sum(shares)
    it = iter(shares)
    return [s if s.output_tokens else replace(s, output_tokens=next(it)) for s in samples]


def _estimate_tokens(text: str) -> int:
    return max(1, -(-len(text.encode()) // 4))


def _int(d: dict[str, Any] | None, key: str) -> int | None:
    if d is None:
        return None
    v = d.get(key)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _request_error(response: httpx.Response, url: str) -> BackendError:
    try:
        detail = response.json()
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
    except ValueError:
        detail = response.text[:500]
    status = response.status_code
    if status == 404:
        return ModelNotFound(f"{url}: HTTP 404 ({detail}); is the model name right?")
    return BackendRequestError(f"{url} rejected the request: HTTP {status}: {json.dumps(detail)[:500]}", status)


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
