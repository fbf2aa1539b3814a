"""OpenAI's response bodies and stream chunks for a run's Results and a plain call's Completion,
with the ``apportion`` field that carries what the run was and what it spent."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from apportion.budget.units import Spend
from apportion.lm.base import Completion
from apportion.result import Candidate, Result
from apportion.serve._requests import ParsedRequest, RequestError
from apportion.serve.apportion_request import AlgorithmChoice
from apportion.serve.openai_app import OPENAI_FINISH, chat_logprobs, legacy_logprobs
from apportion.serve.sse import DONE, event


def answered(result: Result) -> Candidate | None:
    """The chosen candidate of a final result (None where the response is no candidate's text);
    a run that drew nothing is refused: a failure as 502, a budget too small as 400."""
    if not result.candidates:
        if result.error is not None:
            raise RunError(f"the run drew nothing: {result.error}", result, status=502, type="server_error",
                           code="backend_error")
        raise RunError(f"the budget ({result.budget}) cannot pay for one sample"
                       + (f": {result.exhausted_reason}" if result.exhausted_reason else ""), result,
                       code="budget_too_small", param="apportion.budget")
    if result.search is not None and result.search.chosen is not None:
        return result.candidates[result.search.chosen]
    return next((c for c in result.candidates if c.text == result.response), None)


class RunError(RequestError):
    """A run that ended without an answer: the error response carries what it spent."""

    def __init__(self, message: str, result: Result, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.result = result


def finish_reason(chosen: Candidate | None) -> str:
    return OPENAI_FINISH.get(chosen.finish_reason, "stop") if chosen is not None else "stop"


def usage_counts(spent: Spend) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt_tokens": spent.input_tokens, "completion_tokens": spent.output_tokens,
                           "total_tokens": spent.total_tokens}
    if spent.cached_input_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": spent.cached_input_tokens}
    return out


def apportion_field(result: Result, request_id: str, choice: AlgorithmChoice) -> dict[str, Any]:
    """The ``apportion`` field of a final response: the run as ``Result.to_dict`` has it, less the
    response (it is the message), candidates and trace only when asked, the budget's set limits."""
    out = result.to_dict(trace=choice.trace)
    del out["response"]
    if not choice.candidates:
        del out["candidates"]
    out["budget"] = result.budget.limits()
    out["request_id"] = request_id
    return out


def interim_field(result: Result) -> dict[str, Any]:
    """The ``apportion`` field of an interim chunk: the best answer so far and the spend so far."""
    return {"final": False, "answer": result.answer, "distribution": result.distribution,
            "drawn": len(result.candidates), "spent": result.spent.to_dict(), "exhausted": result.exhausted,
            "stop_reason": result.stop_reason}


@dataclass(frozen=True, slots=True)
class Shape:
    """OpenAI's bodies and chunks of one request: chat or completions."""

    chat: bool
    request_id: str
    model: str
    parsed: ParsedRequest
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, finish: str, logprobs: Sequence[float] | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": chat_logprobs(logprobs) if self.parsed.logprobs else None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": legacy_logprobs(logprobs) if self.parsed.logprobs else None,
                "finish_reason": finish}

    def delta(self, index: int = 0, *, role: bool = False, text: str | None = None, finish: str | None = None,
              logprobs: Sequence[float] | None = None) -> dict[str, Any]:
        values = chat_logprobs(logprobs) if self.chat else legacy_logprobs(logprobs)
        shown = values if self.parsed.logprobs and text is not None else None
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": shown, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": shown, "finish_reason": finish}

    def chunk(self, *choices: dict[str, Any], apportion: dict[str, Any] | None = None) -> bytes:
        body = self.envelope(list(choices), chunk=True)
        if self.parsed.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        if apportion is not None:
            body["apportion"] = apportion
        return event(body)

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        return event({**self.envelope([], chunk=True), "usage": usage})

    def plain_body(self, completion: Completion, extra: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
        choices = [self.choice(i, s.text, OPENAI_FINISH.get(s.finish_reason, "stop"), s.logprobs)
                   for i, s in enumerate(completion.samples)]
        return {**self.envelope(choices), "usage": usage, "apportion": extra}

    async def plain_events(self, completion: Completion, extra: dict[str, Any],
                           usage: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        samples = completion.samples
        yield self.chunk(*(self.delta(i, role=True) for i in range(len(samples))))
        yield self.chunk(*(self.delta(i, text=s.text, logprobs=s.logprobs) for i, s in enumerate(samples)))
        yield self.chunk(*(self.delta(i, finish=OPENAI_FINISH.get(s.finish_reason, "stop"))
                           for i, s in enumerate(samples)), apportion=extra)
        if self.parsed.include_usage:
            yield self.usage_chunk(usage)
        yield DONE


def result_body(shape: Shape, result: Result, choice: AlgorithmChoice) -> dict[str, Any]:
    chosen = answered(result)
    text = result.response or ""
    body = shape.envelope([shape.choice(0, text, finish_reason(chosen), chosen.logprobs if chosen else None)])
    return {**body, "usage": usage_counts(result.spent), "apportion": apportion_field(result, shape.request_id, choice)}
