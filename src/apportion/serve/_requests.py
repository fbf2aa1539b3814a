"""OpenAI request bodies read into a Prompt and SamplingParams, or refused with a 400 that names
the field. What is accepted, ignored and refused is listed in ``apportion.serve.openai_app``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from apportion.errors import ConfigError
from apportion.lm.base import Capabilities, Message, Prompt, SamplingParams

# OpenAI's documented defaults where it has them; chat has no fixed max_tokens default (the
# model's context), so ours is SamplingParams' own.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_CHAT_MAX_TOKENS = SamplingParams().max_tokens
DEFAULT_COMPLETION_MAX_TOKENS = 16

_SAMPLING_KEYS = frozenset({"model", "n", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs",
                            "stream", "ignore_eos"})
CHAT_KEYS = _SAMPLING_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "continue_final_message",
                              "add_generation_prompt"}
COMPLETION_KEYS = _SAMPLING_KEYS | {"prompt", "echo", "suffix", "best_of"}

# Keys that never change what is sampled: accepted and ignored whatever their value.
IGNORED_KEYS = frozenset({"user", "metadata", "store", "service_tier", "stream_options",
                          "parallel_tool_calls"})


def _is_neutral_tool_choice(v: Any) -> bool:
    return v in ("none", "auto")


# Keys accepted only with the value that leaves sampling unchanged (their "off" value).
NEUTRAL_VALUES: dict[str, Callable[[Any], bool]] = {
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "repetition_penalty": lambda v: v == 1,
    "logit_bias": lambda v: v == {},
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": _is_neutral_tool_choice,
    "function_call": _is_neutral_tool_choice,
    "response_format": lambda v: v == {"type": "text"},
    "top_k": lambda v: v in (-1, 0),
    "min_p": lambda v: v == 0,
    # vLLM-aware clients (its-hub) send an empty extra_body in the JSON itself
    "extra_body": lambda v: v == {},
    "include_stop_str_in_output": lambda v: v is False,
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(Exception):
    """A request the server refuses; rendered as OpenAI's error object."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        """Sent with the error (WWW-Authenticate on a 401, Retry-After on a 429)."""


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    prompt: Prompt
    params: SamplingParams
    model: str | None
    logprobs: bool
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk carries the usage (streams only)."""
    given: frozenset[str] = frozenset()
    """The body's fields that were set (not null): what the request chose rather than left to defaults."""


def parse_chat(body: Mapping[str, Any], caps: Capabilities, *, extra_keys: frozenset[str] = frozenset(),
               streaming: bool = False) -> ParsedRequest:
    """``extra_keys`` are fields the caller reads itself (accepted here, not read); ``streaming``
    accepts ``stream: true`` (refused otherwise)."""
    body = _present(body)
    _check_keys(body, CHAT_KEYS | extra_keys)
    stream, include_usage = _stream(body, streaming)
    messages = _messages(body.get("messages"))
    prompt = _chat_prompt(messages, body)
    if prompt.assistant_prefix and not caps.continuation:
        raise RequestError("this backend cannot continue a partial assistant message "
                           "(continue_final_message)", param="continue_final_message")
    max_tokens = _max_tokens(body, DEFAULT_CHAT_MAX_TOKENS)
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, minimum=0)
    if top > 20:
        raise RequestError(f"top_logprobs must be an integer in [0, 20], got {top}", param="top_logprobs")
    if "top_logprobs" in body and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    params = _params(body, max_tokens, logprobs)
    return ParsedRequest(prompt, params, _model(body), logprobs, stream, include_usage, frozenset(body))


def parse_completion(body: Mapping[str, Any], caps: Capabilities, *, extra_keys: frozenset[str] = frozenset(),
                     streaming: bool = False) -> ParsedRequest:
    """As ``parse_chat``, for a raw prompt."""
    body = _present(body)
    _check_keys(body, COMPLETION_KEYS | extra_keys)
    stream, include_usage = _stream(body, streaming)
    if not caps.raw_prompt:
        raise RequestError("this backend only takes chat messages: use /v1/chat/completions", param="prompt")
    text = _prompt_text(body.get("prompt"))
    if _bool(body, "echo", False):
        raise RequestError("echo is not supported", param="echo")
    if body.get("suffix"):
        raise RequestError("suffix (insertion) is not supported", param="suffix")
    logprobs = _completion_logprobs(body.get("logprobs"))
    params = _params(body, _max_tokens(body, DEFAULT_COMPLETION_MAX_TOKENS), logprobs)
    if "best_of" in body and body["best_of"] != params.n:
        raise RequestError("best_of (server-side selection) is not supported; it may only equal n",
                           param="best_of")
    return ParsedRequest(Prompt.raw(text), params, _model(body), logprobs, stream, include_usage, frozenset(body))


def _present(body: Mapping[str, Any]) -> dict[str, Any]:
    """JSON null means "not set" in OpenAI's API, so a null field counts as absent."""
    return {k: v for k, v in body.items() if v is not None}


def _check_keys(body: Mapping[str, Any], handled: frozenset[str]) -> None:
    refused = sorted(k for k, v in body.items()
                     if k not in handled and k not in IGNORED_KEYS
                     and not (k in NEUTRAL_VALUES and _neutral(k, v)))
    if refused:
        raise RequestError("unsupported parameter(s): " + ", ".join(refused)
                           + " (they would change the result and this server cannot honour them)",
                           param=refused[0], code="unsupported_parameter")


def _neutral(key: str, value: Any) -> bool:
    try:
        return bool(NEUTRAL_VALUES[key](value))
    except TypeError:
        return False


def _stream(body: Mapping[str, Any], streaming: bool) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage); stream: true refused where the caller cannot stream."""
    stream = _bool(body, "stream", False)
    if not stream:
        return False, False
    if not streaming:
        raise RequestError("stream: true is not supported; send stream: false", param="stream",
                           code="unsupported_parameter")
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    return True, _bool(_present(options), "include_usage", False)


def _messages(raw: Any) -> list[Message]:
    if raw is None:
        raise RequestError("messages is required", param="messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", param="messages")
    return [_message(m, i) for i, m in enumerate(raw)]


def _message(raw: Any, index: int) -> Message:
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise RequestError(f"{param} must be an object with role and content", param=param)
    role = _ROLES.get(raw["role"]) if isinstance(raw.get("role"), str) else None
    if role is None:
        raise RequestError(f"{param}.role {raw.get('role')!r} is not supported (system, developer, user, "
                           "assistant)", param=f"{param}.role")
    extra = sorted(set(raw) - {"role", "content", "name"})
    if extra:
        raise RequestError(f"{param} has unsupported field(s): {', '.join(extra)}", param=param)
    return Message(role, _content(raw.get("content"), f"{param}.content"))


def _content(raw: Any, param: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        parts = []
        for i, part in enumerate(raw):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"{param}[{i}]: only text parts are supported", param=param)
            parts.append(part["text"])
        return "\n".join(parts)  # vLLM's joining of text parts
    raise RequestError(f"{param} must be a string or a list of text parts", param=param)


def _chat_prompt(messages: list[Message], body: Mapping[str, Any]) -> Prompt:
    cont = _bool(body, "continue_final_message", False)
    generation_prompt = _bool(body, "add_generation_prompt", not cont)
    if cont and generation_prompt:
        raise RequestError("continue_final_message and add_generation_prompt cannot both be true",
                           param="add_generation_prompt")
    if not cont and not generation_prompt:
        raise RequestError("add_generation_prompt: false is only supported with continue_final_message: true",
                           param="add_generation_prompt")
    prefix = ""
    if cont:
        if messages[-1].role != "assistant":
            raise RequestError("continue_final_message needs a final assistant message to continue",
                               param="continue_final_message")
        prefix = messages.pop().content
    elif messages[-1].role == "assistant":
        raise RequestError("the last message is an assistant message: set continue_final_message: true to "
                           "continue it", param="messages")
    if not messages:
        raise RequestError("messages holds only the assistant message to continue", param="messages")
    try:
        return Prompt(messages=tuple(messages), assistant_prefix=prefix)
    except ConfigError as exc:
        raise RequestError(str(exc), param="messages") from None


def _prompt_text(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    if isinstance(raw, str):
        return raw
    if raw is None:
        raise RequestError("prompt is required", param="prompt")
    raise RequestError("prompt must be one string (batched and token-id prompts are not supported)",
                       param="prompt")


def _completion_logprobs(raw: Any) -> bool:
    if raw is None or raw is False:
        return False
    if raw is True or (isinstance(raw, int) and 0 <= raw <= 5):
        return True
    raise RequestError(f"logprobs must be an integer in [0, 5], got {raw!r}", param="logprobs")


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    value = _int(body, "max_tokens", default, minimum=1)
    if "max_completion_tokens" in body:
        other = _int(body, "max_completion_tokens", default, minimum=1)
        if "max_tokens" in body and other != value:
            raise RequestError(f"max_tokens ({value}) and max_completion_tokens ({other}) disagree",
                               param="max_completion_tokens")
        value = other
    return value


def _params(body: Mapping[str, Any], max_tokens: int, logprobs: bool) -> SamplingParams:
    temperature = _number(body, "temperature", DEFAULT_TEMPERATURE)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}", param="temperature")
    top_p = _number(body, "top_p", DEFAULT_TOP_P)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", param="seed")
    try:
        return SamplingParams(n=_int(body, "n", 1, minimum=1), max_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, stop=_stop(body.get("stop")), seed=seed, logprobs=logprobs,
                              ignore_eos=_bool(body, "ignore_eos", False))
    except ConfigError as exc:  # the backend's own limits (temperature <= 5)
        raise RequestError(str(exc), param=str(exc).split(" ", 1)[0]) from None


def _stop(raw: Any) -> tuple[str, ...]:
    stops = [raw] if isinstance(raw, str) else raw if raw is not None else []
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of them", param="stop")
    return tuple(stops)


def _model(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    return model


def _int(body: Mapping[str, Any], key: str, default: int, *, minimum: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{key} must be an integer >= {minimum}, got {value!r}", param=key)
    return value


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"{key} must be a number, got {value!r}", param=key)
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be true or false, got {value!r}", param=key)
    return value
