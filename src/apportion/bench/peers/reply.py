"""What a peer module answers with, and what a peer's step-wise search is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from apportion.algorithms.steps import SearchOptions
from apportion.reward.process import ProcessScorer


class PeerReply(NamedTuple):
    """One question's reply: the chosen text, or the error that stopped it; a search's figures
    (``SearchStats`` keys, where the peer's run could be followed) and the question's wall time."""

    text: str | None
    error: str | None
    search: dict[str, int] | None = None
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class PeerSearch:
    """Our process scorer (a fresh one per question) and search settings, for a peer's search."""

    process_scorer: Callable[[], ProcessScorer] = field(compare=False)
    options: SearchOptions | None = None
    """None: our defaults (``SearchOptions()``)."""

    @property
    def settings(self) -> SearchOptions:
        return self.options or SearchOptions()


SCORER_REQUESTS = "scorer_requests"
"""A figure a peer reports and the harness settles: the requests its process scorer sent for the
question, which the endpoint counted beside the search's step requests."""
