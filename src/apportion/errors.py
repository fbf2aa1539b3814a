"""Every error apportion raises on purpose derives from ApportionError, so callers can catch one type."""

from __future__ import annotations


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
    """A backend failed in a way retries did not cure."""


class BackendUnavailable(BackendError):
    """The server could not be reached, or kept failing (5xx, 429, timeouts) past the retry limit."""


class BackendRequestError(BackendError):
    """The server rejected the request (4xx other than 429): retrying would not help."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ModelNotFound(BackendError):
    """The named model is not served by the backend, or its weights are not installed."""


class ConfigError(ApportionError, ValueError):
    """Bad options: unknown algorithm or scorer, incompatible settings."""
