"""Any apportion Backend served over the OpenAI protocol (Starlette ASGI app).

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``. Each request becomes one ``backend.generate(Prompt, SamplingParams)``
call and its Completion one OpenAI response (choices, finish reasons, logprobs when asked, usage).

What a request may carry, and what happens to it. Nothing that changes the result is dropped:
- Honoured: model (checked against the served name; absent means the served model), messages
  (roles system/user/assistant, "developer" read as system, content a string or a list of text
  parts joined with newlines), prompt (one string, or a list holding one), n, max_tokens,
  max_completion_tokens, temperature, top_p, seed, stop, logprobs, top_logprobs, ignore_eos,
  continue_final_message / add_generation_prompt (vLLM's way to continue a final assistant
  message: it becomes ``Prompt.assistant_prefix``; refused where the backend cannot continue).
- Ignored, never changing what is sampled: user, metadata, store, service_tier, stream_options,
  parallel_tool_calls, a message's name; any field whose value is null (OpenAI's "not set").
- Accepted only at their neutral value: presence_penalty=0, frequency_penalty=0,
  repetition_penalty=1, logit_bias={}, tools=[], functions=[], tool_choice/function_call "none"
  or "auto", response_format={"type": "text"}, top_k -1 or 0, min_p=0; best_of=n, echo=false,
  suffix "" (completions).
- Refused with a 400 naming them: stream=true, any other value of those, and any other field.

Known gaps, by necessity rather than choice:
- Backends report per-token log-probabilities, not the tokens themselves: each logprobs entry
  carries an empty "token" (and null "bytes") as a placeholder. ``top_logprobs`` is accepted (our
  own HTTP client sends 1) but alternatives are unknown, so every list of them is empty (chat)
  or null (completions).
- A backend that returns fewer samples than n (a sample bank running out) gives fewer choices;
  nothing is padded.
- Where the backend had to estimate usage, the usage figures are its estimates and the
  ``x-apportion-usage-estimated: true`` header says so; a Completion's notes travel in the
  ``x-apportion-notes`` header (a JSON list).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``:
400 malformed or unsupported requests; 404 an unknown model, route, or a prompt the backend
does not know (ModelNotFound, e.g. a prompt not in a replayed bank); 410 a replayed bank
question whose recorded samples were all served (see ``_EXHAUSTED_STATUS``); 503 backend
unavailable; 502 any other backend failure; 500 anything unexpected.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from apportion.errors import (
    ApportionError,
    BackendError,
    BackendUnavailable,
    BankExhausted,
    BudgetError,
    BudgetExhausted,
    ConfigError,
    ModelNotFound,
)
from apportion.lm.base import Backend, Completion
from apportion.serve._requests import ParsedRequest, RequestError, parse_chat, parse_completion

# Why 410 Gone and not 429 or 409: exhaustion is permanent for this server's lifetime, so a client
# must not retry, and OpenAI clients do retry 429 (and ours also 409: apportion.lm.openai_http's
# _RETRY_STATUS), which would spend several seconds of backoff and then report "HTTP 429" with the
# explanation lost. 410 means exactly "was here, is gone for good", and every client surfaces it.
_EXHAUSTED_STATUS = 410
OPENAI_FINISH = {"stop": "stop", "length": "length", "deadline": "length"}


def openai_app(backend: Backend, *, model_name: str | None = None) -> Starlette:
    """An ASGI app serving ``backend`` under ``model_name`` (default: the backend's model)."""
    served = model_name or backend.model

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(served)]})

    async def model(request: Request) -> JSONResponse:
        name = request.path_params["model"]
        if name != served:
            raise unknown_model(name, served)
        return JSONResponse(model_card(served))

    async def chat(request: Request) -> JSONResponse:
        parsed = parse_chat(await _json_body(request), backend.capabilities)
        completion = await _generate(backend, parsed, served)
        return _reply(completion, chat_body(completion, parsed, served))

    async def completions(request: Request) -> JSONResponse:
        parsed = parse_completion(await _json_body(request), backend.capabilities)
        completion = await _generate(backend, parsed, served)
        return _reply(completion, completion_body(completion, parsed, served))

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers=exception_handlers())


# -- requests ------------------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    return decode_json(await request.body())


def decode_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 saying why not."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError("the request body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


async def _generate(backend: Backend, parsed: ParsedRequest, served: str) -> Completion:
    if parsed.model is not None and parsed.model != served:
        raise unknown_model(parsed.model, served)
    return await backend.generate(parsed.prompt, parsed.params)


def unknown_model(name: str, served: str) -> RequestError:
    return RequestError(f"the model {name!r} does not exist; this server serves {served!r}", status=404,
                        code="model_not_found", param="model")


# -- responses -----------------------------------------------------------------------------------


def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "apportion"}


def _reply(completion: Completion, body: dict[str, Any]) -> JSONResponse:
    headers = {}
    if completion.usage.estimated:
        headers["x-apportion-usage-estimated"] = "true"
    if completion.notes:
        headers["x-apportion-notes"] = json.dumps(list(completion.notes))  # ASCII: json escapes the rest
    return JSONResponse(body, headers=headers)


def _envelope(kind: str, prefix: str, completion: Completion, served: str,
              choices: list[dict[str, Any]]) -> dict[str, Any]:
    usage = completion.usage
    counts: dict[str, Any] = {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                              "total_tokens": usage.total_tokens}
    if usage.cached_input_tokens:  # as OpenAI reports prompt tokens served from a prefix cache
        counts["prompt_tokens_details"] = {"cached_tokens": usage.cached_input_tokens}
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": served,
        "choices": choices,
        "usage": counts,
    }


def chat_body(completion: Completion, parsed: ParsedRequest, served: str) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                "logprobs": chat_logprobs(s.logprobs) if parsed.logprobs else None,
                "finish_reason": OPENAI_FINISH.get(s.finish_reason, "stop")}
               for i, s in enumerate(completion.samples)]
    return _envelope("chat.completion", "chatcmpl", completion, served, choices)


def completion_body(completion: Completion, parsed: ParsedRequest, served: str) -> dict[str, Any]:
    choices = [{"index": i, "text": s.text,
                "logprobs": legacy_logprobs(s.logprobs) if parsed.logprobs else None,
                "finish_reason": OPENAI_FINISH.get(s.finish_reason, "stop")}
               for i, s in enumerate(completion.samples)]
    return _envelope("text_completion", "cmpl", completion, served, choices)


def chat_logprobs(values: Sequence[float] | None) -> dict[str, Any] | None:
    """A chat choice's logprobs of a sample's per-token values."""
    if values is None:
        return None  # the backend has none: null, as OpenAI-compatible servers say "unavailable"
    # Token strings are unknown (backends keep only the values): "" stands in for each token.
    return {"content": [{"token": "", "logprob": lp, "bytes": None, "top_logprobs": []} for lp in values]}


def legacy_logprobs(values: Sequence[float] | None) -> dict[str, Any] | None:
    """A completion choice's logprobs of a sample's per-token values."""
    if values is None:
        return None
    # Placeholder tokens, as in chat; offsets and alternatives are unknown, hence null.
    return {"tokens": [""] * len(values), "token_logprobs": list(values), "top_logprobs": None, "text_offset": None}


# -- errors --------------------------------------------------------------------------------------


def error_object(err: RequestError) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: RequestError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_object(err), status_code=err.status, headers={**err.headers, **(headers or {})})


def as_request_error(exc: Exception) -> RequestError:
    """What a client is told of a failure: its status, message, type and code."""
    if isinstance(exc, RequestError):
        return exc
    # Most specific first: BankExhausted and ModelNotFound are BackendErrors.
    if isinstance(exc, BankExhausted):
        return RequestError(f"sample bank exhausted: {exc}; restart the server to replay again",
                            status=_EXHAUSTED_STATUS, code="bank_exhausted")
    if isinstance(exc, ModelNotFound):
        return RequestError(str(exc), status=404, code="not_found")
    if isinstance(exc, (ConfigError, BudgetError)):
        return RequestError(str(exc))
    if isinstance(exc, BudgetExhausted):
        return RequestError(f"the budget cannot pay for a sample: {exc}", code="budget_too_small")
    if isinstance(exc, BackendUnavailable):
        return RequestError(f"backend unavailable: {exc}", status=503, type="server_error", code="backend_unavailable")
    if isinstance(exc, BackendError):
        return RequestError(f"backend failed: {exc}", status=502, type="server_error", code="backend_error")
    if isinstance(exc, ApportionError):
        return RequestError(f"{type(exc).__name__}: {exc}", status=500, type="server_error")
    return RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500, type="server_error")


def exception_handlers() -> dict[Any, Any]:
    """Starlette's handlers that answer every failure in OpenAI's error format."""
    return {RequestError: _handled, ApportionError: _handled, HTTPException: _http_error, Exception: _handled}


async def _handled(request: Request, exc: Exception) -> JSONResponse:
    return error_response(as_request_error(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    # Allow, on a 405
    return error_response(RequestError(message, status=exc.status_code, type=kind,
                                       code="not_found" if exc.status_code == 404 else None), exc.headers)
