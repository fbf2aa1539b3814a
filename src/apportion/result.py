"""What every algorithm returns: the answer, the candidates behind it, and what was spent."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from operator import attrgetter
from typing import Any

from apportion._slots import slot_builder
from apportion.budget.ledger import CallRecord
from apportion.budget.units import Budget, Spend
from apportion.lm.base import Sample


@dataclass(frozen=True, slots=True)
class Candidate:
    """One sampled solution. ``answer`` is the extracted, normalised answer (None: none found);
    ``votes`` is how many candidates share its answer; ``score`` its scorer's score in [0, 1]."""

    text: str
    answer: str | None
    raw_answer: str | None
    extraction: str | None
    finish_reason: str
    output_tokens: int
    mean_logprob: float | None
    votes: int = 0
    score: float | None = None
    logprobs: tuple[float, ...] | None = field(default=None, repr=False)
    """Per-token log-probabilities of the sampled tokens (for confidence rules; not in to_dict)."""
    confidences: tuple[float, ...] | None = field(default=None, repr=False)
    """Per-token top-k confidences (``Sample.confidences``), where the backend gave them."""
    model: str | None = None
    """The model that drew it (a batch over several models, or a cascade, mixes them)."""
    steps: tuple[str, ...] | None = None
    """A step-wise search's path: its steps in order (None: not drawn step by step)."""
    step_scores: tuple[float | None, ...] | None = None
    """The process scorer's score of each prefix of ``steps`` (``step_scores[k]`` rates
    ``steps[:k+1]``); ``score`` is their aggregate."""

    @classmethod
    def from_sample(cls, sample: Sample, answer: str | None, raw: str | None, method: str | None,
                    model: str | None = None) -> Candidate:
        if cls is not Candidate:
            return cls(sample.text, answer, raw, method, sample.finish_reason, sample.output_tokens,
                       sample.mean_logprob, logprobs=sample.logprobs, confidences=sample.confidences, model=model)
        return _candidate_from_sample(sample.text, answer, raw, method,  # type: ignore[no-any-return]
                                      sample.finish_reason, sample.output_tokens, sample.mean_logprob,
                                      sample.logprobs, sample.confidences, model)

    def with_votes(self, votes: int) -> Candidate:
        """This candidate with ``votes`` set: ``dataclasses.replace(self, votes=votes)``."""
        if type(self) is not Candidate:
            return replace(self, votes=votes)
        values = list(_candidate_values(self))
        values[_VOTES_AT] = votes
        return _build_candidate(*values)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "answer": self.answer,
            "raw_answer": self.raw_answer,
            "extraction": self.extraction,
            "votes": self.votes,
            "score": self.score,
            "finish_reason": self.finish_reason,
            "output_tokens": self.output_tokens,
            "mean_logprob": self.mean_logprob,
            "model": self.model,
            **({"steps": list(self.steps), "step_scores": list(self.step_scores or ())}
               if self.steps is not None else {}),
        }


# A vote builds two candidates per sample, drawn and then a copy with its votes (``_slots``).
_build_candidate = slot_builder(Candidate)
_candidate_from_sample = slot_builder(Candidate, ("text", "answer", "raw_answer", "extraction", "finish_reason",
                                                  "output_tokens", "mean_logprob", "logprobs", "confidences", "model"))
_candidate_values = attrgetter(*(f.name for f in fields(Candidate)))
_VOTES_AT = [f.name for f in fields(Candidate)].index("votes")


@dataclass(frozen=True, slots=True)
class SearchStats:
    """What a step-wise search did. ``steps``: search steps, each one round of concurrent step
    requests for every live path; ``round_trips``: those rounds plus the rounds of process scoring
    that made calls (a step's scoring of cached prefixes only costs none); ``requests``: the step
    requests sent (continuation calls in the trace); ``scoring_calls``: the scorer's calls;
    ``chosen``: the index in ``Result.candidates`` of the path the answer came from; ``width``:
    the most paths the search could finish (N)."""

    steps: int
    round_trips: int
    requests: int
    scoring_calls: int
    chosen: int | None
    width: int

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "round_trips": self.round_trips, "requests": self.requests,
                "scoring_calls": self.scoring_calls, "chosen": self.chosen, "width": self.width}


@dataclass(frozen=True, slots=True)
class Result:
    """``final`` is False for the interim results an algorithm streams while it works.
    ``distribution`` maps each distinct answer to its votes (self-consistency) or summed score
    (weighted best-of-N). ``exhausted`` says the budget, not the algorithm, ended the run.
    ``error`` says a failure (a server that stopped answering) ended it early; ``partial`` that
    the answer is the best of what was drawn before that failure. ``spent`` counts everything,
    failed calls that may have been billed included."""

    answer: str | None
    response: str | None
    algorithm: str
    candidates: tuple[Candidate, ...]
    distribution: dict[str, float]
    spent: Spend
    budget: Budget
    exhausted: bool
    exhausted_reason: str | None
    final: bool
    seed: int | None
    backend: str
    model: str
    trace: tuple[CallRecord, ...] = ()
    notes: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    stop_reason: str | None = None
    """Why a stopping rule ended the run before the budget did (the rule's name, or "give-up")."""
    search: SearchStats | None = None
    """Step-wise searches: steps, round trips, requests and the chosen path (None otherwise)."""

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None

    @property
    def partial(self) -> bool:
        return self.error is not None and bool(self.candidates)

    def to_dict(self, *, trace: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.answer,
            "response": self.response,
            "algorithm": self.algorithm,
            "distribution": self.distribution,
            "candidates": [c.to_dict() for c in self.candidates],
            "spent": self.spent.to_dict(),
            "budget": self.budget.to_dict(),
            "exhausted": self.exhausted,
            "exhausted_reason": self.exhausted_reason,
            "partial": self.partial,
            "error": self.error,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "final": self.final,
            "seed": self.seed,
            "backend": self.backend,
            "model": self.model,
            "notes": list(self.notes),
            "options": self.options,
        }
        if self.search is not None:
            out["search"] = self.search.to_dict()
        if trace:
            out["trace"] = [r.to_dict() for r in self.trace]
        return out
