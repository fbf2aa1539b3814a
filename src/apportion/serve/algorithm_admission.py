"""Admitting a request to ``algorithm_app`` (see its docstring for the contract): the key, the body
within the size limit, the algorithm it names built with the server's defaults, its budget capped by
the server's and the key's maxima, and the quota's grant that narrows it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from apportion.algorithms.base import Algorithm, SamplingOptions, check_budget_can_bind
from apportion.algorithms.planning import Planning
from apportion.algorithms.registry import make_algorithm, needs_process_scorer, takes_process_scorer
from apportion.algorithms.stopping import parse_stop
from apportion.answers.freeform import parse_answer_mode
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, to_fraction
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Message, Prompt
from apportion.reward import SCORERS
from apportion.reward.process import ProcessScorer
from apportion.serve._requests import ParsedRequest, RequestError
from apportion.serve.algorithm_runs import _Ticket
from apportion.serve.apportion_request import AlgorithmChoice, cap
from apportion.serve.hooks import RequestObserver, RequestStarted, notify_started
from apportion.serve.openai_app import decode_json
from apportion.serve.quota_contract import Charge, InvalidKey, KeyInfo, QuotaExceeded, QuotaStore, QuotaStoreFailed

if TYPE_CHECKING:
    from apportion.serve.algorithm_app import ServeOptions


ProcessScorers = Mapping[str, Callable[[], ProcessScorer]]


class Admission:
    """What a request may run and spend: the parts of it the server checks and builds before it
    runs, and the quota's grant."""

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

    async def authenticate(self, request: Request) -> KeyInfo | None:
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

    async def read_body(self, request: Request) -> dict[str, Any]:
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

    def capped(self, budget: Budget, key: KeyInfo | None) -> Budget:
        maxima = [(self.options.max_budget, "this server's"), (key.max_request if key else None, "this key's")]
        return cap(budget, [(maximum, whose) for maximum, whose in maxima if maximum is not None])

    def sampling(self, parsed: ParsedRequest) -> SamplingOptions:
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

    def make(self, choice: AlgorithmChoice, sampling: SamplingOptions, ticket: _Ticket) -> Algorithm:
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

    def prompt(self, prompt: Prompt, algorithm: Algorithm) -> Prompt:
        """The algorithm's instruction first, in a chat that has no system message of its own."""
        instruction = _instruction(algorithm) if self.options.sampling.system_prompt is not None else None
        if not instruction or not prompt.is_chat or any(m.role == "system" for m in prompt.messages):
            return prompt
        return Prompt((Message("system", instruction), *prompt.messages), None, prompt.assistant_prefix)

    async def worst_tokens(self, parsed: ParsedRequest) -> int:
        """The most a plain call can spend: its prompt once per request, and every sample at max_tokens."""
        params = parsed.params
        requests = 1 if params.n == 1 or self.backend.capabilities.native_n else params.n
        return await self.backend.prompt_tokens(parsed.prompt) * requests + params.n * params.max_tokens

    async def admit(self, ticket: _Ticket, budget: Budget, worst_tokens: int | None,
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
