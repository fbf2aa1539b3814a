"""A backend that serves a sample bank: each request for a question gets that question's recorded
samples, without replacement, in a seeded random order, with their real token counts and
log-probabilities. Any algorithm then runs on recorded samples exactly as on a live model.
A per-sample ``cut`` is honoured as a live decode would have honoured it: the sample ends at the
token where the predicate fires, charged for the tokens up to there, with no text (so no answer).

The order for a seed is the one ``bench.replay.replay`` uses for its first order with that seed,
so a live run on this backend and a replay of the bank give the same answers, question by
question (tested).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from apportion.banks import BankEntry, SampleBank
from apportion.budget.units import Price, Usage
from apportion.errors import BankExhausted, ModelNotFound
from apportion.lm.base import Capabilities, Completion, Prompt, Sample, SamplingParams, cut_point


@dataclass(frozen=True, slots=True)
class ReplayShard:
    """One question of a replay backend as it stands: the question's entries, their serving
    orders and how many of each were served, and what the backend says of itself. A backend built
    from it (``ReplayBackend.from_shard``), in another process or on another machine, serves that
    question exactly as the original would next; the original then takes over where it ended
    (``resume``). Small: a worker needs neither the bank file nor the other questions."""

    question: str
    entries: tuple[BankEntry, ...]
    orders: tuple[tuple[int, ...], ...]
    served: tuple[int, ...]
    model: str
    price: Price
    logprobs: bool


class ReplayBackend:
    def __init__(self, bank: SampleBank, *, seed: int | None = 0, model: str | None = None,
                 price: Price | None = None) -> None:
        self.bank = bank
        self._model = model or str(bank.meta.get("model", "bank"))
        self._price = price or Price()
        # a dataset may ask one question twice (MAWPS does): its entries are served one after another
        self._by_question: dict[str, list[int]] = {}
        for i, e in enumerate(bank.entries):
            self._by_question.setdefault(e.problem.question, []).append(i)
        # seed None: the recorded order (a bank of one live run replays that run exactly)
        rng = np.random.default_rng(seed)
        self._orders = [list(range(len(e.samples))) if seed is None else list(rng.permutation(len(e.samples)))
                        for e in bank.entries]
        self._served = [0] * len(bank.entries)
        self._logprobs = bank.has_logprobs or bank.has_confidences
        self._lock = threading.Lock()

    def shard(self, question: str) -> ReplayShard:
        """This question's part of the backend, as it stands now."""
        indices = self._indices(question)
        with self._lock:
            served = tuple(self._served[i] for i in indices)
        return ReplayShard(question, tuple(self.bank.entries[i] for i in indices),
                           tuple(tuple(int(k) for k in self._orders[i]) for i in indices), served,
                           self._model, self._price, self._logprobs)

    @classmethod
    def from_shard(cls, shard: ReplayShard) -> ReplayBackend:
        backend = cls(SampleBank(list(shard.entries), {"model": shard.model}), seed=None, model=shard.model,
                      price=shard.price)
        backend._orders = [list(order) for order in shard.orders]
        backend._served = list(shard.served)
        backend._logprobs = shard.logprobs
        return backend

    def served(self, question: str) -> tuple[int, ...]:
        """How many samples of each of this question's entries were served."""
        indices = self._indices(question)
        with self._lock:
            return tuple(self._served[i] for i in indices)

    def resume(self, question: str, served: tuple[int, ...]) -> None:
        """Continue after what a backend built from this question's shard served (``served`` of it)."""
        indices = self._indices(question)
        if len(served) != len(indices):
            raise ValueError(f"{len(indices)} entries of this question, {len(served)} counts given")
        with self._lock:
            for i, n in zip(indices, served):
                self._served[i] = n

    def _indices(self, question: str) -> list[int]:
        indices = self._by_question.get(question)
        if indices is None:
            raise ModelNotFound(f"prompt not in the bank: {question[:80]!r}")
        return indices

    @property
    def model(self) -> str:
        return self._model

    @property
    def name(self) -> str:
        return "replay"

    @property
    def price(self) -> Price:
        return self._price

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(native_n=True, logprobs=self._logprobs, continuation=False, prefix_cache=False,
                            raw_prompt=True, exact_prompt_tokens=True, cut=True)

    def entry_index(self, prompt: Prompt) -> int:
        """The bank entry a prompt asks about: matched on its question (the last user message, or
        the raw text)."""
        users = [m.content for m in prompt.messages if m.role == "user"]
        question = users[-1] if users else (prompt.text or "")
        indices = self._by_question.get(question)
        if indices is None:
            raise ModelNotFound(f"prompt not in the bank: {question[:80]!r}")
        return next((i for i in indices if self._served[i] < len(self.bank.entries[i].samples)), indices[-1])

    async def prompt_tokens(self, prompt: Prompt) -> int:
        return self.bank.entries[self.entry_index(prompt)].prompt_tokens

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        started = time.monotonic()
        with self._lock:  # choosing among a repeated question's entries reads what was served
            index = self.entry_index(prompt)
            entry = self.bank.entries[index]
            first = self._served[index]
            picks = self._orders[index][first : first + params.n]
            self._served[index] = first + len(picks)
        if not picks:
            raise BankExhausted(f"all {len(entry.samples)} recorded samples of this question were served")
        samples = tuple(_served_sample(entry, int(i), params) for i in picks)
        usage = Usage(len(samples), entry.prompt_tokens, sum(s.output_tokens for s in samples))
        return Completion(samples, usage, self.model, time.monotonic() - started)

    async def aclose(self) -> None:
        return None


def _served_sample(entry: BankEntry, i: int, params: SamplingParams) -> Sample:
    s = entry.samples[i]
    sample = Sample(s.text, s.finish_reason, s.output_tokens, s.logprobs,
                    s.confidences if params.top_logprobs else None)
    at = None if params.cut is None else cut_point(sample, params.cut)
    if at is not None:
        sample = Sample("", "cut", at, s.logprobs[:at] if s.logprobs else None,
                        sample.confidences[:at] if sample.confidences else None)
    return sample if params.logprobs else Sample(sample.text, sample.finish_reason, sample.output_tokens,
                                                 None, sample.confidences)
