"""What a batch sends a remote worker for one prompt's round, and what the worker does with it.

A ``Job`` is plain data, picklable: the algorithm (its options, scorer and stopping rule), a
spec the worker rebuilds its backend from, the prompt, seed and earlier candidates, and the
limits and remainders of the prompt's ledger and of the ledgers above it. The worker runs the
algorithm on stand-in ledgers (``Ledger.standing_in``) that clamp, refuse and say why exactly as
the driver's would, and sends back a ``Reply``: the result, what the round spent (kinds, calls,
estimates and overruns), its call records, the ledgers' exhaustion reasons, and the backend's
state afterwards (a replayed bank's serving position). The driver's accounting is in
``allocate.executors``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from apportion.algorithms.base import Algorithm
from apportion.budget.ledger import CallRecord, Ledger, Remaining
from apportion.budget.units import Budget, Spend
from apportion.errors import ApportionError, ConfigError, RunFailed
from apportion.lm.base import Backend
from apportion.lm.llama_embedded import EmbeddedOptions, LlamaEmbeddedBackend
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.lm.replay import ReplayBackend, ReplayShard
from apportion.result import Candidate, Result


class BackendSpec(Protocol):
    """How a worker rebuilds the backend a prompt runs on."""

    def build(self) -> Backend: ...

    def state(self, backend: Backend) -> Any:
        """What the driver's backend takes over after the job (None: nothing)."""

    def closes(self) -> bool:
        """Whether the worker closes the backend after the job (not when it keeps it for the next)."""


@dataclass(frozen=True, slots=True)
class ReplaySpec:
    """One question of a replayed bank, where its serving stands: the worker continues it."""

    shard: ReplayShard

    def build(self) -> Backend:
        return ReplayBackend.from_shard(self.shard)

    def state(self, backend: Backend) -> tuple[int, ...]:
        assert isinstance(backend, ReplayBackend)
        return backend.served(self.shard.question)

    def closes(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class HTTPSpec:
    """An OpenAI-compatible server: the worker opens its own client (the API key goes with it)."""

    options: HTTPOptions

    def build(self) -> Backend:
        return OpenAIHTTPBackend(self.options)

    def state(self, backend: Backend) -> None:
        return None

    def closes(self) -> bool:
        return True


# A worker process keeps each embedded model it loaded: loading takes seconds, a round far less.
_models: dict[str, LlamaEmbeddedBackend] = {}
_models_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class EmbeddedSpec:
    """The embedded model; a ``model_path`` must exist on the worker too."""

    options: EmbeddedOptions

    def build(self) -> Backend:
        key = repr(self.options)
        with _models_lock:
            if key not in _models:
                _models[key] = LlamaEmbeddedBackend(self.options)
            return _models[key]

    def state(self, backend: Backend) -> None:
        return None

    def closes(self) -> bool:
        return False


def spec_for(backend: Backend, prompt: str) -> BackendSpec:
    """The spec of ``backend`` for a job on ``prompt`` (a replay backend: that question's shard)."""
    if isinstance(backend, ReplayBackend):
        return ReplaySpec(backend.shard(prompt))
    if isinstance(backend, OpenAIHTTPBackend):
        return HTTPSpec(backend.options)
    if isinstance(backend, LlamaEmbeddedBackend):
        return EmbeddedSpec(backend.options)
    raise ConfigError(f"a remote executor cannot send the {backend.name!r} backend to a worker; "
                      "it sends replayed banks, OpenAI-compatible servers and the embedded model")


def lane_of(backend: Backend, prompt: str) -> tuple[int, str] | None:
    """Jobs of one lane share backend state, so they run one after another (None: no lane): a
    replayed question's jobs continue one serving order."""
    return (id(backend), prompt) if isinstance(backend, ReplayBackend) else None


def take_over(backend: Backend, spec: BackendSpec, state: Any) -> None:
    """Bring the driver's backend to where the worker's ended."""
    if isinstance(spec, ReplaySpec) and state is not None:
        assert isinstance(backend, ReplayBackend)
        backend.resume(spec.shard.question, tuple(state))


@dataclass(frozen=True, slots=True)
class Job:
    algorithm: Algorithm
    backend: BackendSpec
    prompt: str
    seed: int | None
    prior: tuple[Candidate, ...]
    budget: Budget
    """The prompt's ledger's limits (its deadline counted from when the job was sent)."""
    left: Remaining
    """What of them remains."""
    above: Budget | None
    """The limits of the ledgers above it (None: none above)."""
    above_left: Remaining | None
    """What of those this job may use."""
    trace: tuple[CallRecord, ...] = ()
    """The prompt's calls in earlier rounds: a result's trace and notes cover the whole run."""


@dataclass(frozen=True, slots=True)
class Reply:
    result: Result | None
    failure: str | None
    """None; "run-failed" (no candidate drawn: ``result`` says what was spent); "error" (an
    ApportionError, ``message``); or "crash" (any other exception on the worker)."""
    message: str | None
    spent: Spend
    """What this job spent, and no more (the prompt's earlier rounds are the driver's)."""
    calls: tuple[CallRecord, ...]
    exhausted_reason: str | None
    above_exhausted_reason: str | None
    backend_state: Any = None


async def serve(job: Job) -> Reply:
    """Run ``job`` on stand-in ledgers; failures come back in the reply with what was spent."""
    above = None if job.above is None or job.above_left is None else Ledger.standing_in(job.above, job.above_left)
    ledger = Ledger.standing_in(job.budget, job.left, parent=above)
    ledger.trace.extend(job.trace)
    backend: Backend | None = None
    result: Result | None = None
    failure = message = None
    state = None
    try:
        backend = job.backend.build()
        result = await job.algorithm.run(backend, job.prompt, ledger, seed=job.seed, prior=job.prior)
    except RunFailed as exc:
        result, failure, message = exc.result, "run-failed", str(exc)
    except ApportionError as exc:
        failure, message = "error", str(exc)
    except Exception as exc:  # a bug here must not lose the spend: the driver settles it and reports it
        failure, message = "crash", f"{type(exc).__name__}: {exc}"
    finally:
        if backend is not None:
            state = job.backend.state(backend)
            if job.backend.closes():
                await backend.aclose()
    return Reply(result, failure, message, ledger.spend(), tuple(ledger.trace[len(job.trace):]),
                 ledger.exhausted_reason, None if above is None else above.exhausted_reason, state)


# One event loop per worker process, kept: backends a worker keeps (an embedded model) live on it.
_loop: asyncio.AbstractEventLoop | None = None


def run_job(job: Job) -> Reply:
    """``serve`` for a worker that calls plain functions (a Ray task)."""
    global _loop
    if _loop is None or _loop.is_closed():
        _loop = asyncio.new_event_loop()
    return _loop.run_until_complete(serve(job))
