"""Every error apportion raises on purpose derives from ApportionError, so callers can catch one type."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from apportion.budget.units import Usage


class ApportionError(Exception):
    """Base of all deliberate apportion errors; the message names the problem and how to fix it."""


class BudgetError(ApportionError, ValueError):
    """A budget or price that cannot be honoured (malformed, non-positive, unsatisfiable)."""


class BudgetExhausted(ApportionError):
    """Raised by the metered layer when the ledger refuses a call: nothing useful fits any more."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendError(ApportionError):
    """A backend failed in a way retries did not cure.

    What the failed request cost travels with the error, so the ledger charges it as a paid API
    would bill it: ``billed`` says the request reached the server and may have consumed tokens
    there (a reply cut off or unusable after generation, a hang); ``consumed`` is what it is known
    to have consumed (None with ``billed``: unknown, so the caller charges its reserved worst
    case). ``retryable`` says a new request may succeed; ``retry_after`` is how long to wait first.
    """

    def __init__(self, message: str, *, billed: bool = False, consumed: Usage | None = None,
                 retryable: bool = False, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.billed = billed or consumed is not None
        self.consumed = consumed
        self.retryable = retryable
        self.retry_after = retry_after


class BackendUnavailable(BackendError):
    """The server could not be reached, or kept failing (5xx, 429, timeouts) past the retry limit."""


class BackendTimeout(BackendUnavailable):
    """The server took the request and did not answer in time: it may have generated (billed)."""


class BackendRequestError(BackendError):
    """The server rejected the request (4xx other than 429): retrying would not help."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DeadlineReached(BackendError):
    """The run's deadline came before the server answered; the request may still have been billed."""


class ModelNotFound(BackendError):
    """The named model is not served by the backend, or its weights are not installed."""


class BankExhausted(BackendError):
    """A replayed sample bank has served every recorded sample of a question."""


class ScoringFailed(BackendError):
    """A scorer's calls failed for some candidates; ``scores`` holds what the others got (None
    where a call failed), so the candidates and the scores already paid for are kept."""

    def __init__(self, message: str, scores: list[float | None]) -> None:
        super().__init__(message)
        self.scores = scores


class ProcessScoringFailed(ScoringFailed):
    """A process scorer's calls failed (or the budget ran out, ``exhausted``) for some step
    prefixes after others were scored: ``step_scores[i][k]`` is the score of path i's first k+1
    steps, None where it could not be had; ``scores`` holds each path's newest step's score."""

    def __init__(self, message: str, step_scores: list[list[float | None]], *, exhausted: bool = False) -> None:
        super().__init__(message, [s[-1] if s else None for s in step_scores])
        self.step_scores = step_scores
        self.exhausted = exhausted


class RunFailed(ApportionError):
    """A run could not draw a single candidate. ``result`` still says what the attempts spent
    (a ``Result`` with no answer and ``error`` set)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class ConfigError(ApportionError, ValueError):
    """Bad options: unknown algorithm or scorer, incompatible settings."""
