"""Continuous batching: every request in flight on one model, decoded together.

One thread owns the model and runs a loop of steps. A step is one ``decode`` of a batch that
holds the next token of every sequence being decoded plus a chunk of prompt tokens of sequences
being prefilled, so a long prompt never stalls the others. Sequences (one per sample) take a
slot as soon as one is free and leave as soon as they finish; nobody waits for the longest
sample of a batch.

Admission is fair: a free slot goes to the queued request with the fewest sequences running
(then the oldest), so one request of n=64 takes the slots only while nobody else waits. A
sequence is admitted only if its worst case (prompt plus ``max_tokens``) fits the KV cells not
yet used or promised, evicting prefix-cache entries to make room; so the cache never overflows
whatever the burst, and what does not fit waits in the queue.

Prefixes are shared: a sequence about to prefill takes the longest prefix of its prompt that
some sequence or cache entry already holds (a cell copy, no compute), or waits a step for a
sequence that is prefilling that prefix right now. So the n samples of a request, the paths of
a search that continue one question, and requests with one system prompt prefill it once. Every
sequence decodes at least its prompt's last token itself, for its own first logits.

Cancellation (the request's future cancelled) and deadlines are looked at every step: the
request's sequences leave at once and free their slots; a deadline returns what each running
sample had (finish "deadline").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from apportion.errors import BackendError, ConfigError
from apportion.lm.base import Partial, Sample, SamplingParams
from apportion.lm.kv_cells import CellPool, KVOps, common_prefix
from apportion.lm.sampling import sample_token

_log = logging.getLogger(__name__)

Row = tuple[int, int, int, bool]
"""One batch entry: token, position, sequence id, whether its logits are wanted."""


class DecodeModel(KVOps, Protocol):
    """What the scheduler needs of a model: llama.cpp's, or a fake's in tests."""

    n_vocab: int

    def decode(self, rows: Sequence[Row]) -> int:
        """0 on success, 1 when the cache had no room for the batch, anything else an error."""
        ...

    def logits(self, row: int) -> np.ndarray: ...

    def is_eog(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class SchedulerOptions:
    slots: int = 8
    """Sequences decoded together."""
    kv_cells: int = 8192
    """Size of the KV cache in cells (tokens), shared by every sequence and the prefix cache."""
    cache_cells: int = 2048
    """Most cells that only prefix-cache entries hold (at most kv_cells in effect)."""
    cache_entries: int = 32
    """Most prefix-cache entries (each is a sequence id of the model)."""
    chunk: int = 256
    """Prompt tokens prefilled in one step beside the decoding sequences' tokens (slots that
    decode nothing lend their room to the prefill)."""
    seq_ctx: int = 4096
    """Most tokens (prompt plus sample) in one sequence."""
    max_queued: int = 4096
    """Requests waiting beyond this are refused (backpressure), not queued."""

    def __post_init__(self) -> None:
        if self.slots < 1 or self.chunk < 1 or self.cache_entries < 0 or self.max_queued < 1:
            raise ConfigError("slots >= 1, chunk >= 1, cache_entries >= 0 and max_queued >= 1 are required")
        if self.kv_cells < self.seq_ctx or self.seq_ctx < 16:
            raise ConfigError(f"kv_cells ({self.kv_cells}) must hold one whole sequence of seq_ctx "
                              f"({self.seq_ctx}) tokens, and seq_ctx >= 16")
        if self.cache_cells < 0:
            raise ConfigError("cache_cells must be >= 0")

    @property
    def seq_ids(self) -> int:
        return self.slots + self.cache_entries


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started. The prefix hit rate counts each request's prompt
    once (its first sequence): the tokens it found in the cache instead of prefilling them."""

    requests: int = 0
    samples: int = 0
    steps: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    decoded_tokens: int = 0
    shared_sample_tokens: int = 0
    """Prompt cells the 2nd..nth samples of a request took from the first."""
    cancelled: int = 0
    peak_cells: int = 0
    peak_active: int = 0
    peak_queued: int = 0
    evictions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        out["prefix_hit_rate"] = self.prefix_hit_rate
        return out


@dataclass(frozen=True, slots=True)
class Outcome:
    samples: list[Sample]
    prompt_tokens: int
    cached_tokens: int


@dataclass(eq=False, slots=True)
class _Request:
    tokens: list[int]
    params: SamplingParams
    seeds: list[int]
    max_tokens: int
    deadline: float | None
    future: Future[Outcome]
    order: int
    waiting: list[int]
    """Sample indices not yet admitted, in order."""
    samples: dict[int, Sample] = field(default_factory=dict)
    running: int = 0
    cached: int | None = None

    def timed_out(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False, slots=True)
class _Seq:
    request: _Request
    index: int
    seq_id: int
    rng: np.random.Generator
    filled: int = 0
    started: bool = False
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    text: str = ""
    finish: str | None = None
    promised: int = 0
    """Cells this sequence may still add (its worst case, counted against the cache)."""

    @property
    def prompt(self) -> list[int]:
        return self.request.tokens

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.request.tokens)


class Scheduler:
    """Owns ``model`` from its own thread; ``submit`` may be called from any thread. With
    ``thread=False`` nobody runs the loop: the caller calls ``step`` (tests drive it so)."""

    def __init__(self, model: DecodeModel, options: SchedulerOptions, *,
                 clock: Callable[[], float] = time.monotonic, thread: bool = True) -> None:
        self.model = model
        self.options = options
        self.clock = clock
        self.pool = CellPool(model, options.kv_cells, range(1, options.seq_ids + 1),
                              min(options.cache_cells, options.kv_cells))
        self.stats = EngineStats()
        self._open: list[_Request] = []
        self._seqs: list[_Seq] = []  # admitted, in admission order
        self._cond = threading.Condition()
        self._order = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._run, name="apportion-decode", daemon=True)
            self._thread.start()

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, tokens: list[int], params: SamplingParams, seeds: list[int],
               deadline: float | None = None) -> Future[Outcome]:
        """Queue ``len(seeds)`` samples of ``tokens``; the future resolves when every sample is
        done (or the deadline passed). Cancelling the future frees its slots at the next step."""
        if not tokens:
            raise ConfigError("the prompt is empty after tokenization")
        max_tokens = min(params.max_tokens, self.options.seq_ctx - len(tokens))
        if max_tokens < 1:
            raise ConfigError(f"a prompt of {len(tokens)} tokens leaves no room in the "
                              f"{self.options.seq_ctx}-token context of a sequence (raise seq_ctx)")
        future: Future[Outcome] = Future()
        with self._cond:
            if self._closed:
                raise BackendError("the embedded engine is closed")
            if sum(1 for r in self._open if r.waiting) >= self.options.max_queued:
                raise BackendError(f"the embedded engine's queue is full ({self.options.max_queued} "
                                   "requests waiting); retry later or raise max_queued")
            self._order += 1
            self._open.append(_Request(list(tokens), params, list(seeds), max_tokens, deadline, future,
                                        self._order, list(range(len(seeds)))))
            self.stats.requests += 1
            self.stats.peak_queued = max(self.stats.peak_queued, sum(1 for r in self._open if r.waiting))
            self._cond.notify()
        future.add_done_callback(self._wake)
        return future

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            self._fail_all(BackendError("the embedded engine was closed"))

    @property
    def active(self) -> int:
        """Sequences holding a slot now."""
        return len(self._seqs)

    def _wake(self, _: object) -> None:
        with self._cond:
            self._cond.notify()

    # -- the decode thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._seqs and not self._open:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                if not self.step():
                    with self._cond:
                        self._cond.wait(0.005)  # everything waits on a deadline or a prefill
            except Exception as exc:  # a broken model fails every request, not the thread silently
                _log.exception("decode loop failed")
                self._fail_all(exc if isinstance(exc, BackendError) else BackendError(f"decode loop failed: {exc}"))
        self._fail_all(BackendError("the embedded engine was closed"))

    def step(self) -> bool:
        """One decode of every sequence's next token and a prefill chunk. False if nothing ran."""
        now = self.clock()
        self._reap(now)
        self._admit()
        self._start()
        rows, owners = self._plan()
        if not rows:
            return False
        rc = self.model.decode(rows)
        while rc == 1 and self.pool.evict_one():  # no contiguous room: free cache cells, again
            rc = self.model.decode(rows)
        if rc != 0:
            raise BackendError(f"llama.cpp decode failed (code {rc}) with {self.pool.used} cells in use")
        self.stats.steps += 1
        self._advance(rows, owners)
        self.stats.peak_cells = max(self.stats.peak_cells, self.pool.used)
        self.stats.evictions = self.pool.evictions
        return True

    def _reap(self, now: float) -> None:
        with self._cond:
            open_requests = list(self._open)
        for request in open_requests:
            if request.future.cancelled():
                for seq in [s for s in self._seqs if s.request is request]:
                    self._seqs.remove(seq)
                    self.pool.release(seq.seq_id)
                with self._cond:
                    self._open.remove(request)
                self.stats.cancelled += 1
            elif request.timed_out(now):
                request.waiting.clear()
                for seq in [s for s in self._seqs if s.request is request]:
                    seq.finish = "deadline"
                    self._finish(seq)
                self._settle(request)

    def _admit(self) -> None:
        free = self.pool.capacity - self.pool.used - sum(s.promised for s in self._seqs)
        while len(self._seqs) < self.options.slots:
            with self._cond:
                candidates = [r for r in self._open if r.waiting]
                if not candidates:
                    return
                request = min(candidates, key=lambda r: (r.running, r.order))
            need = len(request.tokens) + request.max_tokens - 1
            while free < need and self.pool.evict_one():
                free = self.pool.capacity - self.pool.used - sum(s.promised for s in self._seqs)
            if free < need:
                if not self._seqs:
                    raise BackendError(f"a sequence of {need} tokens cannot fit the {self.pool.capacity}-cell KV cache")
                return  # waits for running sequences to finish
            seq_id = self.pool.new_owner()
            if seq_id is None:
                return
            index = request.waiting.pop(0)
            seq = _Seq(request, index, seq_id, np.random.default_rng(request.seeds[index]), promised=need)
            self._seqs.append(seq)
            request.running += 1
            free -= need
            self.stats.samples += 1
            self.stats.peak_active = max(self.stats.peak_active, len(self._seqs))

    def _start(self) -> None:
        """Each new sequence takes the longest prefix held anywhere, or waits for one that a
        prefilling sequence will hold shortly."""
        for seq in self._seqs:
            if seq.started:
                continue
            want = seq.prompt[:-1]
            source, length = self.pool.match(want, exclude=seq.seq_id) if want else (-1, 0)
            if any(other.started and other.prefilling and other.filled < len(want)
                   and common_prefix(other.prompt, want) > max(length, other.filled)
                   for other in self._seqs if other is not seq):
                continue
            if length:
                self.pool.share(source, seq.seq_id, length)
                seq.filled = length
                seq.promised -= length
            seq.started = True
            request = seq.request
            if request.cached is None:
                request.cached = length
                self.stats.prompt_tokens += len(seq.prompt)
                self.stats.cached_tokens += length
            else:
                self.stats.shared_sample_tokens += length

    def _plan(self) -> tuple[list[Row], list[tuple[_Seq, int]]]:
        """The batch: one token per decoding sequence, then prompt chunks in admission order."""
        rows: list[Row] = []
        owners: list[tuple[_Seq, int]] = []
        for seq in self._seqs:
            if seq.started and not seq.prefilling:
                rows.append((seq.tokens[-1], len(seq.prompt) + len(seq.tokens) - 1, seq.seq_id, True))
                owners.append((seq, 1))
        budget = self.options.chunk + self.options.slots - len(rows)  # the batch's room
        # Shortest remainder first: the 2nd..nth samples of a request have one token left each.
        for seq in sorted((s for s in self._seqs if s.started and s.prefilling),
                          key=lambda s: len(s.prompt) - s.filled):
            if budget <= 0:
                break
            take = min(budget, len(seq.prompt) - seq.filled)
            last = seq.filled + take == len(seq.prompt)
            for pos in range(seq.filled, seq.filled + take):
                rows.append((seq.prompt[pos], pos, seq.seq_id, last and pos == seq.filled + take - 1))
            owners.append((seq, take))
            budget -= take
        return rows, owners

    def _advance(self, rows: list[Row], owners: list[tuple[_Seq, int]]) -> None:
        at = 0
        for seq, count in owners:
            decoded = [row[0] for row in rows[at : at + count]]
            self.pool.extend(seq.seq_id, decoded)
            seq.promised -= count
            at += count
            if seq.prefilling:
                seq.filled += count
                self.stats.prefilled_tokens += count
                if seq.prefilling:
                    continue
            else:
                self.stats.decoded_tokens += 1
            self._sample(seq, at - 1)
            if seq.finish is not None:
                self._finish(seq)

    def _sample(self, seq: _Seq, row: int) -> None:
        params = seq.request.params
        token, logprob, confidence = sample_token(
            self.model.logits(row), params.temperature, params.top_p, seq.rng,
            params.logprobs or params.cut is not None, params.top_logprobs)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if confidence is not None:
            seq.confidences.append(confidence)
        seq.tokens.append(token)
        if not params.ignore_eos and self.model.is_eog(token):
            seq.finish = "stop"
            return
        piece = self.model.piece(token)
        seq.data += piece
        seq.text = seq.data.decode("utf-8", errors="ignore")
        for stop in params.stop:
            found = seq.text.find(stop, max(0, len(seq.text) - len(piece) - len(stop) - 4))
            if found >= 0:
                seq.text, seq.finish = seq.text[:found], "stop"
                return
        if len(seq.tokens) >= seq.request.max_tokens:
            seq.finish = "length"
        elif params.cut is not None and params.cut(Partial(seq.text, seq.logprobs, seq.confidences)):
            seq.finish = "cut"

    def _finish(self, seq: _Seq) -> None:
        """A sample is done: its cells stay as a prefix-cache entry, its slot is free."""
        request = seq.request
        self._seqs.remove(seq)
        request.running -= 1
        if seq.tokens:
            request.samples[seq.index] = _to_sample(seq)
        if self.options.cache_entries and seq.started:
            self.pool.retire(seq.seq_id)
        else:
            self.pool.release(seq.seq_id)
        self._settle(request)

    def _settle(self, request: _Request) -> None:
        if request.running or request.waiting or request.future.done():
            return
        with self._cond:
            if request in self._open:
                self._open.remove(request)
        samples = [request.samples[i] for i in sorted(request.samples)]
        if request.future.set_running_or_notify_cancel():
            request.future.set_result(Outcome(samples, len(request.tokens), request.cached or 0))

    def _fail_all(self, error: BaseException) -> None:
        for seq in list(self._seqs):
            self._seqs.remove(seq)
            self.pool.release(seq.seq_id)
        with self._cond:
            queued, self._open = self._open, []
        for request in queued:
            if request.future.set_running_or_notify_cancel():
                request.future.set_exception(error)


def _to_sample(seq: _Seq) -> Sample:
    params = seq.request.params
    text = seq.text if seq.finish == "stop" else seq.data.decode("utf-8", errors="replace")
    return Sample(text, seq.finish or "length", len(seq.tokens),
                  tuple(seq.logprobs) if seq.logprobs and params.logprobs else None,
                  tuple(seq.confidences) if seq.confidences else None)
