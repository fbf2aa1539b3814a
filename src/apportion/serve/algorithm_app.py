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

import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from apportion.algorithms.base import SamplingOptions
from apportion.budget.units import Budget, Spend
from apportion.errors import ConfigError
from apportion.lm.base import Backend
from apportion.lm.metered import MeteredLM
from apportion.reward import SCORERS
from apportion.serve._bodies import Shape, answered, result_body, usage_counts
from apportion.serve._requests import ParsedRequest, RequestError, parse_chat, parse_completion
from apportion.serve.algorithm_admission import Admission, ProcessScorers
from apportion.serve.algorithm_runs import AlgorithmRun, _error, _json, _result_events, _Ticket
from apportion.serve.apportion_request import Routing, route
from apportion.serve.hooks import RequestFinished, RequestObserver, notify_finished
from apportion.serve.openai_app import as_request_error, exception_handlers, model_card, unknown_model
from apportion.serve.quota_contract import Charge, QuotaStore
from apportion.serve.sse import ClientGone, EventStreamResponse, unless_disconnected

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


class _Service:
    def __init__(self, backend: Backend, options: ServeOptions, quota: QuotaStore | None,
                 observers: tuple[RequestObserver, ...], process_scorers: ProcessScorers) -> None:
        self.admission = Admission(backend, options, quota, observers, process_scorers)
        self.backend = backend
        self.options = options
        self.quota = quota
        self.observers = observers
        self.served = options.model_name or backend.model

    # -- routes ----------------------------------------------------------------------------------

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.served})

    async def models(self, request: Request) -> JSONResponse:
        await self.admission.authenticate(request)
        return JSONResponse({"object": "list", "data": [model_card(self.served)]})

    async def model(self, request: Request) -> JSONResponse:
        await self.admission.authenticate(request)
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
            return _error(err, ticket)
        finally:
            if not streaming:
                with anyio.CancelScope(shield=True):  # a server shutting down still settles what was spent
                    await self._close(ticket)

    async def _handle(self, request: Request, ticket: _Ticket) -> Response:
        ticket.key = await self.admission.authenticate(request)
        body = await self.admission.read_body(request)
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
        budget = self.admission.capped(Budget(generations=parsed.params.n), ticket.key)
        worst = await self.admission.worst_tokens(parsed)
        ledger = await self.admission.admit(ticket, budget, worst, None)
        lm = MeteredLM(self.backend, ledger)
        completion = await unless_disconnected(request.receive, lm.generate(parsed.prompt, parsed.params))
        shape = Shape(ticket.route == "chat", ticket.request_id, echo, parsed)
        spent = ledger.spend()
        extra = {"algorithm": None, "budget": ledger.budget.limits(), "spent": spent.to_dict(),
                 "request_id": ticket.request_id, "notes": list(completion.notes)}
        if not parsed.stream:
            return _json(shape.plain_body(completion, extra, usage_counts(spent)), ticket)
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
        algorithm = self.admission.make(choice, self.admission.sampling(parsed), ticket)
        budget = self.admission.capped(choice.budget or self.options.default_budget, ticket.key)
        ledger = await self.admission.admit(ticket, budget, None, algorithm)
        run = ticket.run = AlgorithmRun(algorithm, self.backend, self.admission.prompt(parsed.prompt, algorithm),
                                        ledger, parsed.params.seed)
        shape = Shape(ticket.route == "chat", ticket.request_id, echo, parsed)
        if not parsed.stream:
            result = await unless_disconnected(request.receive, run.final())
            return _json(result_body(shape, result, choice), ticket)
        first = await unless_disconnected(request.receive, run.next())
        if first.final:
            answered(first)  # refused as a whole response, before any event
        return self._stream(ticket, _result_events(ticket, shape, choice, run, first))

    # -- responses -------------------------------------------------------------------------------

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
