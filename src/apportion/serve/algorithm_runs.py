"""The plumbing of one request of ``algorithm_app``: its state from arrival until it is closed
(``_Ticket``), the algorithm's run on a task of its own (``AlgorithmRun``), the events of a streamed
run, and the JSON and error responses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from apportion.algorithms.base import Algorithm
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.lm.base import Backend, Prompt
from apportion.result import Result
from apportion.serve._bodies import (
    RunError,
    Shape,
    answered,
    apportion_field,
    finish_reason,
    interim_field,
    usage_counts,
)
from apportion.serve._requests import RequestError
from apportion.serve.apportion_request import AlgorithmChoice
from apportion.serve.openai_app import as_request_error, error_object
from apportion.serve.quota_contract import KeyInfo
from apportion.serve.sse import DONE, event


@dataclass(slots=True)
class _Ticket:
    """One request's state, from arrival until it is closed (once): what runs, what it may spend,
    the quota reservation to settle, and what the observers are told."""

    request_id: str
    route: str
    started: float
    key: KeyInfo | None = None
    algorithm: str | None = None
    stream: bool = False
    budget: Budget | None = None
    ledger: Ledger | None = None
    reserved: bool = False
    run: AlgorithmRun | None = None
    closables: list[Any] = field(default_factory=list)
    status: int = 200
    outcome: str = "ok"
    error: str | None = None
    stream_done: bool = False
    """The stream ran to its end (otherwise the client went away mid-stream)."""
    closed: bool = False
    narrowed: str | None = None
    """What the key's quota had left where it granted less than the request asked for."""

    def failed(self, err: RequestError) -> None:
        self.status = err.status
        self.outcome = "refused" if err.status < 500 else "failed"
        self.error = err.message


class AlgorithmRun:
    """An algorithm's ``stream`` on a task of its own, its results handed over through a queue.
    ``close`` cancels the task and waits for it: the ledger's spend is final when it returns."""

    def __init__(self, algorithm: Algorithm, backend: Backend, prompt: Prompt, ledger: Ledger,
                 seed: int | None) -> None:
        self._queue: asyncio.Queue[Result | BaseException | None] = asyncio.Queue()
        self._task = asyncio.create_task(self._drain(algorithm.stream(backend, prompt, ledger, seed=seed)),
                                         name=f"apportion-{algorithm.name}")

    async def _drain(self, results: AsyncIterator[Result]) -> None:
        try:
            async for result in results:
                self._queue.put_nowait(result)
        except Exception as exc:  # handed to the reader, who answers the client with it
            self._queue.put_nowait(exc)
            return
        self._queue.put_nowait(None)

    async def next(self) -> Result:
        item = await self._queue.get()
        if item is None:
            raise RuntimeError("the algorithm ended without a final result")
        if isinstance(item, BaseException):
            raise item
        return item

    async def final(self) -> Result:
        result = await self.next()
        while not result.final:
            result = await self.next()
        return result

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait((self._task,))


# -- a streamed run -------------------------------------------------------------------------------


async def _result_events(ticket: _Ticket, shape: Shape, choice: AlgorithmChoice, run: AlgorithmRun,
                         result: Result) -> AsyncGenerator[bytes, None]:
    try:
        yield shape.chunk(shape.delta(role=True), apportion=None if result.final else interim_field(result))
        while not result.final:
            result = await run.next()
            if not result.final:
                yield shape.chunk(shape.delta(), apportion=interim_field(result))
        chosen = answered(result)
        yield shape.chunk(shape.delta(text=result.response or "", logprobs=chosen.logprobs if chosen else None))
        final = apportion_field(result, shape.request_id, choice)
        yield shape.chunk(shape.delta(finish=finish_reason(chosen)), apportion=final)
        if shape.parsed.include_usage:
            yield shape.usage_chunk(usage_counts(result.spent))
        yield DONE
    except Exception as exc:
        err = as_request_error(exc)
        ticket.outcome, ticket.error = "refused" if err.status < 500 else "failed", err.message
        yield event(error_object(err))


# -- responses ------------------------------------------------------------------------------------


def _json(body: dict[str, Any], ticket: _Ticket) -> JSONResponse:
    return JSONResponse(body, headers={"x-request-id": ticket.request_id})


def _error(err: RequestError, ticket: _Ticket) -> JSONResponse:
    if err.code == "budget_too_small" and ticket.narrowed is not None:
        # Too small because the quota is nearly spent: the quota's refusal, not the request's fault
        # (a plain call's refusal is the ledger's BudgetExhausted, not a RunError).
        message = f"{ticket.narrowed}, too few for this request ({err.message})"
        err = (RunError(message, err.result, status=429, type="insufficient_quota", code="quota_too_small")
               if isinstance(err, RunError) else
               RequestError(message, status=429, type="insufficient_quota", code="quota_too_small"))
        ticket.failed(err)
    headers = {**err.headers, "x-request-id": ticket.request_id}
    body = error_object(err)
    if isinstance(err, RunError):  # it ran: what it spent
        body["apportion"] = {"request_id": ticket.request_id, "algorithm": err.result.algorithm,
                             "budget": err.result.budget.limits(), "spent": err.result.spent.to_dict(),
                             "exhausted_reason": err.result.exhausted_reason, "error": err.result.error}
    elif ticket.ledger is not None:
        # Admitted, then failed (a plain call whose backend timed out may be billed): the spend the
        # key is charged with is in the body too, so a client's own count can match its quota's.
        body["apportion"] = {"request_id": ticket.request_id, "algorithm": ticket.algorithm,
                             "budget": ticket.ledger.budget.limits(), "spent": ticket.ledger.spend().to_dict(),
                             "error": err.message}
    return JSONResponse(body, status_code=err.status, headers=headers)
