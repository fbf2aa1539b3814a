"""Every algorithm behind the OpenAI protocol (``apportion serve``): each request runs an algorithm
under a budget and answers as one OpenAI completion (see docs/serve.md for the whole contract).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (the backend's
model only), ``GET /v1/models/{id}``, ``GET /health``.

A request chooses its algorithm by an ``apportion`` object in its body or by a prefix of its model
name (``apportion.serve.apportion_request``); with neither it is one plain backend call, as
``openai_app`` makes it, ``n`` included, but metered: its spend is reported and charged like any
run's. Under an algorithm:

- The budget is the request's (or the server's default), capped by the server's maximum per request
  and the key's: a unit the request leaves unlimited takes the maximum's limit, a unit over it is a
  400 naming the limit.
- temperature, top_p, max_tokens (max_completion_tokens), stop become the algorithm's sampling
  options; seed seeds the run; what the request leaves unset is the server's (``ServeOptions.sampling``,
  the CLI's --max-tokens, --temperature, --top-p). logprobs returns the chosen candidate's. ``n > 1``
  and ``ignore_eos`` are refused: the algorithm draws its samples itself and returns one answer.
- A chat without a system message gets the algorithm's own instruction first (what ``apportion run``
  sends: "End with 'The answer is N'", the step format of the searches...), since answers are read
  and steps split by it; a system message of the client's replaces it, and ``--system-prompt ''``
  sends the messages as they are.
- The response has one choice, the chosen response; ``usage`` is everything the run spent (input
  and output tokens of every call, scorers' included); ``apportion`` has the spend in every unit,
  the algorithm, the budget it ran under, the answer, why it stopped, and the candidates and trace
  when asked.
- ``stream: true``: the run's interim results ride in the ``apportion`` field of chunks with empty
  deltas; the chosen response is sent as the content delta at the end (deltas only append, and the
  best answer may change until the run ends), then the finish chunk (with the full ``apportion``
  field), the usage chunk if ``stream_options.include_usage``, and ``data: [DONE]``. The headers go
  out with the first interim result, so that a request the algorithm refuses at its start still
  gets a proper 4xx; a failure after that is an ``error`` event, which OpenAI clients raise.
- A client that disconnects, streaming or not, cancels the run: its backend calls are cancelled
  and their reservations charged at their worst case (the backend may have generated them).

Keys and quotas (``quota``): every /v1 request needs ``Authorization: Bearer <key>`` (401 without a
valid one); the key's ``max_request`` caps the budget as the server's maximum does; the store
grants the request's worst case in tokens and dollars before it runs (429 with Retry-After when a
quota has nothing left), the grant becomes the run's token and dollar limits, and what the run
spent is settled after it, however it ended.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from fractions import Fraction
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from apportion.algorithms.base import Algorithm, SamplingOptions, check_budget_can_bind
from apportion.algorithms.planning import Planning
from apportion.algorithms.registry import make_algorithm, needs_process_scorer, takes_process_scorer
from apportion.algorithms.stopping import parse_stop
from apportion.answers.freeform import parse_answer_mode
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Spend, to_fraction
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Message, Prompt
from apportion.lm.metered import MeteredLM
from apportion.result import Result
from apportion.reward import SCORERS
from apportion.reward.process import ProcessScorer
from apportion.serve._bodies import (
    RunError,
    Shape,
    answered,
    apportion_field,
    finish_reason,
    interim_field,
    result_body,
    usage_counts,
)
from apportion.serve._requests import ParsedRequest, RequestError, parse_chat, parse_completion
from apportion.serve.apportion_request import AlgorithmChoice, Routing, cap, route
from apportion.serve.hooks import (
    RequestFinished,
    RequestObserver,
    RequestStarted,
    notify_finished,
    notify_started,
)
from apportion.serve.openai_app import (
    as_request_error,
    decode_json,
    error_object,
    exception_handlers,
    model_card,
    unknown_model,
)
from apportion.serve.quota_contract import Charge, InvalidKey, KeyInfo, QuotaExceeded, QuotaStore, QuotaStoreFailed
from apportion.serve.sse import DONE, ClientGone, EventStreamResponse, event, unless_disconnected

log = logging.getLogger(__name__)

_CLIENT_GONE = 499
"""No response reaches a client that went away; the status recorded for it (nginx's convention)."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What the server decides for every request."""

    default_budget: Budget = field(default_factory=lambda: Budget(generations=8))
    """The budget of a request that names an algorithm and no budget."""
    max_budget: Budget | None = field(default_factory=lambda: Budget(generations=64, total_tokens=1_000_000))
    """The most one request may ask for (None: no limit but the key's). A unit a request leaves
    unlimited takes this limit, so every run is bounded in the units set here."""
    max_request_tokens: int = 100_000
    """With quotas: the tokens reserved for a request whose budget sets none (no ``max_budget``
    tokens, none in the key's ``max_request``), so that its worst case is always bounded."""
    max_body_bytes: int = 1 << 20
    """A larger request body is refused with a 413, before it is read in full."""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    """Sampling of what a request leaves unset under an algorithm, and the instruction a chat
    without a system message gets (``system_prompt``; None: none)."""
    scorer: str = "self-certainty"
    """Best-of-N's outcome scorer where a request names none."""
    process_scorer: str | None = None
    """A step-wise search's process scorer where a request names none (a name of the app's process scorers)."""
    model_name: str | None = None
    """The name the model is served under (default: the backend's)."""

    def __post_init__(self) -> None:
        if self.max_request_tokens < 1:
            raise ConfigError(f"max_request_tokens must be >= 1, got {self.max_request_tokens}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.scorer not in SCORERS:
            raise ConfigError(f"unknown scorer {self.scorer!r}; known: {', '.join(sorted(SCORERS))}")
        if self.max_budget is not None:
            over = [u for u, limit in self.max_budget.limits().items()
                    if getattr(self.default_budget, u) is not None and getattr(self.default_budget, u) > limit]
            if over:
                raise ConfigError(f"the default budget ({self.default_budget}) exceeds the maximum per request "
                                  f"({self.max_budget}) in {', '.join(over)}")


ProcessScorers = Mapping[str, Callable[[], ProcessScorer]]


def algorithm_app(backend: Backend, options: ServeOptions | None = None, *, quota: QuotaStore | None = None,
                  observers: Sequence[RequestObserver] = (),
                  process_scorers: ProcessScorers | None = None) -> Starlette:
    """An ASGI app running algorithms on ``backend`` per request. ``quota``: keys and quotas (None:
    open to all). ``observers`` hear of every request. ``process_scorers`` are the process scorers a
    request may name (a client never names a URL to call: a process reward model is the server's
    to configure)."""
    service = _Service(backend, options or ServeOptions(), quota, tuple(observers), dict(process_scorers or {}))
    routes = [
        Route("/health", service.health, methods=["GET"]),
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/models/{model:path}", service.model, methods=["GET"]),
        Route("/v1/chat/completions", service.chat, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers=exception_handlers())


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


class _Service:
    def __init__(self, backend: Backend, options: ServeOptions, quota: QuotaStore | None,
                 observers: tuple[RequestObserver, ...], process_scorers: ProcessScorers) -> None:
        if options.process_scorer is not None and options.process_scorer not in process_scorers:
            raise ConfigError(f"the default process scorer {options.process_scorer!r} is not among those offered: "
                              f"{', '.join(process_scorers) or 'none'}")
        self.backend = backend
        self.options = options
        self.quota = quota
        self.observers = observers
        self.process_scorers = process_scorers
        self.served = options.model_name or backend.model

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.served})

    async def models(self, request: Request) -> JSONResponse:
        await self._authenticate(request)
        return JSONResponse({"object": "list", "data": [model_card(self.served)]})

    async def model(self, request: Request) -> JSONResponse:
        await self._authenticate(request)
        name = request.path_params["model"]
        if name != self.served:
            raise unknown_model(name, self.served)
        return JSONResponse(model_card(self.served))

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completions")

    # -- one request -----------------------------------------------------------------------------

    async def _complete(self, request: Request, kind: str) -> Response:
        ticket = _Ticket(f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", kind, time.monotonic())
        streaming = False
        try:
            response = await self._handle(request, ticket)
            streaming = isinstance(response, EventStreamResponse)  # it closes the ticket when the stream ends
            return response
        except ClientGone:
            ticket.status, ticket.outcome, ticket.error = _CLIENT_GONE, "cancelled", "the client disconnected"
            return Response(status_code=_CLIENT_GONE)
        except Exception as exc:
            err = as_request_error(exc)
            ticket.failed(err)
            if err.status >= 500:
                log.log(logging.ERROR if err.status == 500 else logging.WARNING, "%s: %s", ticket.request_id,
                        err.message, exc_info=err.status == 500)
            return self._error(err, ticket)
        finally:
            if not streaming:
                with anyio.CancelScope(shield=True):  # a server shutting down still settles what was spent
                    await self._close(ticket)

    async def _handle(self, request: Request, ticket: _Ticket) -> Response:
        ticket.key = await self._authenticate(request)
        body = await self._read_body(request)
        routing = route(body, self.served)
        if routing.model is not None and routing.model != self.served:
            raise unknown_model(routing.model, self.served)
        parse = parse_chat if ticket.route == "chat" else parse_completion
        parsed = parse(body, self.backend.capabilities, extra_keys=frozenset({"apportion"}), streaming=True)
        ticket.stream = parsed.stream
        echo = body.get("model") or self.served
        if routing.choice is None:
            return await self._plain(request, ticket, parsed, echo)
        return await self._algorithm(request, ticket, parsed, routing, echo)

    async def _plain(self, request: Request, ticket: _Ticket, parsed: ParsedRequest, echo: str) -> Response:
        budget = self._capped(Budget(generations=parsed.params.n), ticket.key)
        worst = await self._worst_tokens(parsed)
        ledger = await self._admit(ticket, budget, worst, None)
        lm = MeteredLM(self.backend, ledger)
        completion = await unless_disconnected(request.receive, lm.generate(parsed.prompt, parsed.params))
        shape = Shape(ticket.route == "chat", ticket.request_id, echo, parsed)
        spent = ledger.spend()
        extra = {"algorithm": None, "budget": ledger.budget.limits(), "spent": spent.to_dict(),
                 "request_id": ticket.request_id, "notes": list(completion.notes)}
        if not parsed.stream:
            return self._json(shape.plain_body(completion, extra, usage_counts(spent)), ticket)
        return self._stream(ticket, shape.plain_events(completion, extra, usage_counts(spent)))

    async def _algorithm(self, request: Request, ticket: _Ticket, parsed: ParsedRequest, routing: Routing,
                         echo: str) -> Response:
        choice = routing.choice
        assert choice is not None
        ticket.algorithm = choice.algorithm
        if parsed.params.n > 1:
            raise RequestError(f"n must be 1 under an algorithm, got {parsed.params.n}: the algorithm draws its own "
                               f"samples ({choice.algorithm} spends the budget's generations) and answers with the one "
                               "it chooses; set apportion.budget instead", param="n")
        if parsed.params.ignore_eos:
            raise RequestError("ignore_eos is not supported under an algorithm: its samples must end where the model "
                               "ends them to be read", param="ignore_eos", code="unsupported_parameter")
        algorithm = self._make(choice, self._sampling(parsed), ticket)
        budget = self._capped(choice.budget or self.options.default_budget, ticket.key)
        ledger = await self._admit(ticket, budget, None, algorithm)
        run = ticket.run = AlgorithmRun(algorithm, self.backend, self._prompt(parsed.prompt, algorithm), ledger,
                                        parsed.params.seed)
        shape = Shape(ticket.route == "chat", ticket.request_id, echo, parsed)
        if not parsed.stream:
            result = await unless_disconnected(request.receive, run.final())
            return self._json(result_body(shape, result, choice), ticket)
        first = await unless_disconnected(request.receive, run.next())
        if first.final:
            answered(first)  # refused as a whole response, before any event
        return self._stream(ticket, self._result_events(ticket, shape, choice, run, first))

    async def _result_events(self, ticket: _Ticket, shape: Shape, choice: AlgorithmChoice, run: AlgorithmRun,
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

    # -- the parts of a request ------------------------------------------------------------------

    async def _authenticate(self, request: Request) -> KeyInfo | None:
        if self.quota is None:
            return None
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not secret.strip():
            raise RequestError("this server needs an API key: send the header Authorization: Bearer <key>",
                               status=401, code="invalid_api_key", headers=challenge)
        try:
            return await self.quota.authenticate(secret.strip())
        except InvalidKey as exc:
            raise RequestError(f"invalid API key: {exc}", status=401, code="invalid_api_key",
                               headers=challenge) from None
        except QuotaStoreFailed as exc:
            raise _store_unavailable(exc) from None

    async def _read_body(self, request: Request) -> dict[str, Any]:
        limit = self.options.max_body_bytes
        too_large = RequestError(f"the request body is larger than this server's limit of {limit} bytes",
                                 status=413, code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return decode_json(b"".join(chunks))

    def _capped(self, budget: Budget, key: KeyInfo | None) -> Budget:
        maxima = [(self.options.max_budget, "this server's"), (key.max_request if key else None, "this key's")]
        return cap(budget, [(maximum, whose) for maximum, whose in maxima if maximum is not None])

    def _sampling(self, parsed: ParsedRequest) -> SamplingOptions:
        """The server's sampling, with what the request set."""
        base, params, given = self.options.sampling, parsed.params, parsed.given
        changes: dict[str, Any] = {}
        if given & {"max_tokens", "max_completion_tokens"}:
            changes["max_tokens"] = params.max_tokens
            changes["min_tokens"] = min(base.min_tokens, params.max_tokens)
        for name in ("temperature", "top_p", "stop"):
            if name in given:
                changes[name] = getattr(params, name)
        try:
            return replace(base, **changes)
        except ConfigError as exc:
            raise RequestError(str(exc), param=str(exc).split(" ", 1)[0]) from None

    def _make(self, choice: AlgorithmChoice, sampling: SamplingOptions, ticket: _Ticket) -> Algorithm:
        scorer_name = choice.scorer or self.options.scorer
        if scorer_name not in SCORERS:
            raise RequestError(f"unknown scorer {scorer_name!r}; known: {', '.join(sorted(SCORERS))}",
                               param="apportion.scorer")
        try:
            stopping = parse_stop(choice.stop) if choice.stop is not None else None
        except ConfigError as exc:
            raise RequestError(f"apportion.stop: {exc}", param="apportion.stop") from None
        process_name = choice.process_scorer
        if process_name is None and takes_process_scorer(choice.algorithm):
            process_name = self.options.process_scorer
        if process_name is not None and process_name not in self.process_scorers:
            raise RequestError(f"unknown process scorer {process_name!r}; this server offers: "
                               f"{', '.join(self.process_scorers) or 'none'}", param="apportion.process_scorer")
        if choice.answers is not None:
            try:
                sampling = replace(sampling, answers=parse_answer_mode(choice.answers))
            except ConfigError as exc:
                raise RequestError(f"apportion.answers: {exc}", param="apportion.answers") from None
        scorer = SCORERS[scorer_name]()
        process = self.process_scorers[process_name]() if process_name is not None else None
        ticket.closables.extend(x for x in (scorer, process) if x is not None)
        try:
            algorithm = make_algorithm(choice.algorithm, sampling, scorer, stopping, process_scorer=process,
                                       settings=dict(choice.settings) or None)
        except ConfigError as exc:
            raise RequestError(f"{choice.algorithm}: {exc}", param="apportion") from None
        if needs_process_scorer(algorithm) and process is None:
            raise RequestError(f"{choice.algorithm} needs apportion.process_scorer, what rates each step; this server "
                               f"offers: {', '.join(self.process_scorers) or 'none'}", param="apportion.process_scorer")
        return algorithm

    def _prompt(self, prompt: Prompt, algorithm: Algorithm) -> Prompt:
        """The algorithm's instruction first, in a chat that has no system message of its own."""
        instruction = _instruction(algorithm) if self.options.sampling.system_prompt is not None else None
        if not instruction or not prompt.is_chat or any(m.role == "system" for m in prompt.messages):
            return prompt
        return Prompt((Message("system", instruction), *prompt.messages), None, prompt.assistant_prefix)

    async def _worst_tokens(self, parsed: ParsedRequest) -> int:
        """The most a plain call can spend: its prompt once per request, and every sample at max_tokens."""
        params = parsed.params
        requests = 1 if params.n == 1 or self.backend.capabilities.native_n else params.n
        return await self.backend.prompt_tokens(parsed.prompt) * requests + params.n * params.max_tokens

    async def _admit(self, ticket: _Ticket, budget: Budget, worst_tokens: int | None,
                     algorithm: Algorithm | None) -> Ledger:
        """The run's ledger, under the key's quota grant where there are quotas."""
        check_budget_can_bind(budget, self.backend, algorithm)  # before reserving: a grant only narrows it
        if self.quota is not None and ticket.key is not None:
            want = self._want(budget, worst_tokens)
            try:
                grant = await self.quota.reserve(ticket.key, ticket.request_id, want)
            except QuotaExceeded as exc:
                raise RequestError(str(exc), status=429, type="insufficient_quota", code=f"{exc.quota}_quota_exceeded",
                                   headers=_retry_after(exc.resets_at, exc.retry_after_s)) from None
            except QuotaStoreFailed as exc:
                raise _store_unavailable(exc) from None
            ticket.reserved = True
            if grant.tokens < want.tokens or grant.usd < want.usd:
                ticket.narrowed = (f"the key's quota had {grant.tokens} tokens"
                                   + (f" and ${float(grant.usd):.6g}" if want.usd else "") + " left this period")
            budget = _within(budget, want, grant)
        ticket.budget = budget
        ticket.ledger = Ledger(budget)
        notify_started(self.observers, RequestStarted(ticket.request_id, ticket.route, ticket.algorithm, budget,
                                                      ticket.key.key_id if ticket.key else None, ticket.stream))
        return ticket.ledger

    def _want(self, budget: Budget, worst_tokens: int | None) -> Charge:
        """What to reserve of a quota: the budget's tokens (or the server's per-request default) and
        the dollars they can cost at most, or the budget's dollars where fewer."""
        tokens = budget.total_tokens if budget.total_tokens is not None else self.options.max_request_tokens
        if worst_tokens is not None:
            tokens = min(tokens, worst_tokens)
        price = self.backend.price
        usd = tokens * max(price.per_input_token(), price.per_output_token())
        if budget.usd is not None:
            usd = min(usd, to_fraction(budget.usd)) if usd else to_fraction(budget.usd)
        return Charge(tokens=tokens, usd=usd, requests=1)

    # -- responses -------------------------------------------------------------------------------

    def _json(self, body: dict[str, Any], ticket: _Ticket) -> JSONResponse:
        return JSONResponse(body, headers={"x-request-id": ticket.request_id})

    def _error(self, err: RequestError, ticket: _Ticket) -> JSONResponse:
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

    def _stream(self, ticket: _Ticket, events: AsyncGenerator[bytes, None]) -> EventStreamResponse:
        async def tracked() -> AsyncGenerator[bytes, None]:
            try:
                async for chunk in events:
                    yield chunk
                ticket.stream_done = True
            finally:
                await events.aclose()

        return EventStreamResponse(tracked(), lambda: self._close(ticket), headers={"x-request-id": ticket.request_id})

    async def _close(self, ticket: _Ticket) -> None:
        """Stop the run, settle the quota with what it spent, tell the observers. Once."""
        if ticket.closed:
            return
        ticket.closed = True
        if ticket.run is not None:
            await ticket.run.close()
        if ticket.stream and ticket.status == 200 and ticket.outcome == "ok" and not ticket.stream_done:
            ticket.outcome, ticket.error = "cancelled", "the client disconnected mid-stream"
        spent = ticket.ledger.spend() if ticket.ledger is not None else Spend()
        for each in ticket.closables:
            close = getattr(each, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("%s: closing %r failed", ticket.request_id, each)
        if ticket.reserved and self.quota is not None:
            try:
                await self.quota.settle(ticket.request_id, Charge(spent.total_tokens, spent.usd, 1))
            except Exception:  # the store's problem; its recover() charges the reservation at its grant
                log.exception("%s: settling the quota failed", ticket.request_id)
        notify_finished(self.observers, RequestFinished(
            ticket.request_id, ticket.route, ticket.algorithm, ticket.key.key_id if ticket.key else None,
            ticket.stream, ticket.status, ticket.outcome, time.monotonic() - ticket.started, spent, ticket.budget,
            ticket.error))


# -- helpers ---------------------------------------------------------------------------------------


def _store_unavailable(exc: QuotaStoreFailed) -> RequestError:
    # Nothing ran and nothing was reserved: the client may retry once the store is back.
    return RequestError(f"the key and quota store is unavailable: {exc}", status=503, type="server_error",
                        code="quota_store_unavailable", headers={"Retry-After": "5"})


def _within(budget: Budget, want: Charge, grant: Charge) -> Budget:
    """``budget`` limited to a quota's grant (the run can then not spend past it)."""
    if grant.tokens <= 0 or (want.usd > 0 and grant.usd <= 0):
        raise RequestError("this key's quota has nothing left for this request", status=429, type="insufficient_quota",
                           code="quota_exceeded")
    changes: dict[str, Any] = {}
    if budget.total_tokens is None or grant.tokens < budget.total_tokens:
        changes["total_tokens"] = grant.tokens
    if want.usd > 0 and (grant.usd < want.usd or budget.usd is not None):
        limit = grant.usd if budget.usd is None else min(grant.usd, to_fraction(budget.usd))
        changes["usd"] = _float_at_most(limit)
    return replace(budget, **changes) if changes else budget


def _float_at_most(value: Fraction) -> float:
    """The largest float whose exact money value (``to_fraction``) does not exceed ``value``."""
    out = float(value)
    while to_fraction(out) > value:
        out = math.nextafter(out, 0.0)
    return out


def _retry_after(resets_at: datetime | None, retry_after_s: float | None = None) -> dict[str, str]:
    if retry_after_s is not None:
        return {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    if resets_at is None:
        return {}
    now = datetime.now(resets_at.tzinfo)
    return {"Retry-After": str(max(1, math.ceil((resets_at - now).total_seconds())))}


def _instruction(algorithm: Algorithm) -> str | None:
    """The system prompt the algorithm asks its questions with (a planning run: its base's)."""
    base = algorithm.base if isinstance(algorithm, Planning) else algorithm
    sampling = getattr(getattr(base, "options", None), "sampling", None)
    return sampling.system_prompt if isinstance(sampling, SamplingOptions) else None


