"""The continuous-batching decode loop against a fake model whose logits are a function of the
whole token history each sequence's KV cells hold. So a prefix shared from the wrong sequence,
a missing cell or a cell at the wrong position changes what is sampled, and every concurrent run
can be checked against the same requests run alone. The fake also keeps llama.cpp's physical
cell count (a cell shared by several sequences counts once) and refuses a decode past capacity."""

from __future__ import annotations

import hashlib
import itertools
from concurrent.futures import CancelledError

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.errors import BackendError, ConfigError
from apportion.lm.base import SamplingParams
from apportion.lm.scheduler import Row, Scheduler, SchedulerOptions

EOG = 0


class FakeModel:
    n_vocab = 24

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.cells: dict[int, dict[int, tuple[int, int]]] = {}  # seq -> pos -> (token, cell id)
        self._ids = itertools.count()
        self._out: list[np.ndarray] = []
        self.decodes = 0
        self.peak = 0
        self.batch_sizes: list[int] = []

    def physical(self) -> int:
        return len({cell for seq in self.cells.values() for _, cell in seq.values()})

    def decode(self, rows: list[Row]) -> int:
        if self.physical() + len(rows) > self.capacity:
            return 1
        self.decodes += 1
        self.batch_sizes.append(len(rows))
        out = []
        for token, pos, seq, want in rows:
            held = self.cells.setdefault(seq, {})
            assert pos not in held, f"sequence {seq} already has a cell at {pos}"
            assert all(p in held for p in range(pos)), f"sequence {seq} decodes {pos} with a gap"
            held[pos] = (token, next(self._ids))
            if want:
                history = tuple(held[p][0] for p in range(pos + 1))
                out.append(_logits(history, self.n_vocab))
            else:
                out.append(None)
        self._out = out
        self.peak = max(self.peak, self.physical())
        return 0

    def logits(self, row: int) -> np.ndarray:
        found = self._out[row]
        assert found is not None, "logits read from a row that did not ask for them"
        return found

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def piece(self, token: int) -> bytes:
        return f"<{token}>".encode()

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        for pos, cell in self.cells.get(src, {}).items():
            if p0 <= pos < p1:
                self.cells.setdefault(dst, {})[pos] = cell

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        assert (p0, p1) == (-1, -1)
        self.cells.pop(seq, None)


def _logits(history: tuple[int, ...], n_vocab: int) -> np.ndarray:
    digest = hashlib.blake2b(repr(history).encode(), digest_size=8).digest()
    return (np.random.default_rng(int.from_bytes(digest, "little")).normal(size=n_vocab) * 2.5).astype(np.float32)


def make(capacity: int = 4096, **options: int) -> tuple[Scheduler, FakeModel]:
    opts = SchedulerOptions(kv_cells=capacity, seq_ctx=min(capacity, options.pop("seq_ctx", 512)), **options)
    model = FakeModel(capacity)
    return Scheduler(model, opts, thread=False), model


def drain(scheduler: Scheduler, model: FakeModel, limit: int = 100_000) -> None:
    for _ in range(limit):
        if not scheduler.step() and not scheduler.active:
            return
        assert scheduler.pool.used == model.physical(), "the pool's count differs from the cache's"
        assert scheduler.pool.used <= scheduler.pool.capacity
    raise AssertionError("the loop did not finish")


def solo(tokens: list[int], params: SamplingParams, seeds: list[int]) -> list[tuple[str, str, int]]:
    scheduler, model = make(cache_entries=0)
    future = scheduler.submit(tokens, params, seeds)
    drain(scheduler, model)
    return [(s.text, s.finish_reason, s.output_tokens) for s in future.result().samples]


PARAMS = SamplingParams(n=1, max_tokens=12, temperature=1.0)


def test_one_request_of_n_prefills_its_prompt_once_and_reproduces_alone():
    scheduler, model = make()
    prompt = list(range(1, 40))
    future = scheduler.submit(prompt, PARAMS, [7, 8, 9, 10])
    drain(scheduler, model)
    outcome = future.result()
    assert len(outcome.samples) == 4 and outcome.prompt_tokens == 39 and outcome.cached_tokens == 0
    # the first sample prefilled 39 tokens; the other three took 38 of them and decoded the last
    assert scheduler.stats.prefilled_tokens == 39 + 3
    assert scheduler.stats.shared_sample_tokens == 3 * 38
    for seed, sample in zip([7, 8, 9, 10], outcome.samples, strict=True):
        assert [(sample.text, sample.finish_reason, sample.output_tokens)] == solo(prompt, PARAMS, [seed])


def test_a_later_request_finds_its_prefix_in_the_cache():
    scheduler, model = make()
    system = list(range(1, 60))
    first = scheduler.submit([*system, 70, 71], PARAMS, [1])
    drain(scheduler, model)
    second = scheduler.submit([*system, 80, 81, 82], PARAMS, [2])
    drain(scheduler, model)
    assert first.result().cached_tokens == 0
    assert second.result().cached_tokens == len(system)
    assert scheduler.stats.prefix_hit_rate == pytest.approx(59 / (61 + 62))
    got = second.result().samples[0]
    assert [(got.text, got.finish_reason, got.output_tokens)] == solo([*system, 80, 81, 82], PARAMS, [2])


def test_concurrent_requests_sharing_a_prefix_prefill_it_once():
    scheduler, model = make(chunk=64)
    shared = list(range(1, 300))
    futures = [scheduler.submit([*shared, 300 + i], PARAMS, [i]) for i in range(8)]
    drain(scheduler, model)
    # one request prefilled the 299 shared tokens; each of the others its own last two
    assert scheduler.stats.prefilled_tokens == 300 + 7
    assert scheduler.stats.cached_tokens == 7 * 299
    for i, future in enumerate(futures):
        got = future.result().samples[0]
        assert [(got.text, got.finish_reason, got.output_tokens)] == solo([*shared, 300 + i], PARAMS, [i])


def test_decoding_sequences_share_the_batch_with_prompt_chunks():
    scheduler, model = make(chunk=32, slots=4)
    short = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True), [0])
    scheduler.step()
    scheduler.step()
    long = scheduler.submit(list(range(1, 200)), PARAMS, [1])
    steps_before = len(model.batch_sizes)
    drain(scheduler, model)
    # while the long prompt was prefilled 32 tokens a step, the short one kept decoding
    assert len(short.result().samples[0].text) > 0 and long.result().samples
    assert max(model.batch_sizes[steps_before:]) <= 32 + 4  # chunk plus the slots' room
    assert short.result().samples[0].output_tokens == 40


def test_a_cut_predicate_ends_one_sequence_inside_the_shared_loop():
    scheduler, model = make()
    cut_after = SamplingParams(n=1, max_tokens=30, temperature=1.0, ignore_eos=True,
                               cut=lambda partial: len(partial.text) >= 4 * 5)
    cut = scheduler.submit([5, 6, 7], cut_after, [1])
    other = scheduler.submit([8, 9], SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True), [2])
    drain(scheduler, model)
    [sample] = cut.result().samples
    assert sample.finish_reason == "cut" and sample.output_tokens < 30
    assert other.result().samples[0].output_tokens == 30


def test_cancelling_frees_the_slots_at_the_next_step():
    scheduler, model = make(slots=4)
    long = SamplingParams(n=1, max_tokens=400, temperature=1.0, ignore_eos=True)
    big = scheduler.submit(list(range(1, 20)), long, list(range(6)))
    for _ in range(5):
        scheduler.step()
    assert scheduler.active == 4
    big.cancel()
    waiting = scheduler.submit([3, 4], PARAMS, [0])
    scheduler.step()
    assert scheduler.active == 1  # the cancelled request's four slots were freed in one step
    drain(scheduler, model)
    assert waiting.result().samples
    with pytest.raises(CancelledError):
        big.result()
    assert scheduler.stats.cancelled == 1
    assert model.physical() == scheduler.pool.used


def test_a_big_request_does_not_starve_a_small_one():
    scheduler, model = make(slots=4, capacity=8192)
    big = scheduler.submit([1, 2, 3], SamplingParams(n=64, max_tokens=20, temperature=1.0, ignore_eos=True),
                           list(range(64)))
    scheduler.step()
    small = scheduler.submit([4, 5], SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), [0])
    steps = 0
    while not small.done():
        scheduler.step()
        steps += 1
    # the small request waited for one slot (at most one sample of the big one), not for 64
    assert steps <= 2 * 20 + 4
    assert not big.done()
    drain(scheduler, model)
    assert len(big.result().samples) == 64


def test_a_deadline_returns_what_each_running_sample_has():
    now = [0.0]
    model = FakeModel(4096)
    scheduler = Scheduler(model, SchedulerOptions(kv_cells=4096, seq_ctx=512, slots=2),
                          clock=lambda: now[0], thread=False)
    future = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=300, temperature=1.0, ignore_eos=True),
                              [1, 2, 3], deadline=5.0)
    for _ in range(10):
        scheduler.step()
    now[0] = 6.0
    scheduler.step()
    samples = future.result().samples
    assert len(samples) == 2  # the third sample never got a slot before the deadline
    assert {s.finish_reason for s in samples} == {"deadline"}
    assert all(0 < s.output_tokens < 300 for s in samples)
    assert scheduler.active == 0


def test_bad_requests_and_a_full_queue_are_refused_by_name():
    scheduler, _ = make(max_queued=2)
    with pytest.raises(ConfigError, match="empty"):
        scheduler.submit([], PARAMS, [0])
    with pytest.raises(ConfigError, match="no room"):
        scheduler.submit(list(range(1, 600)), PARAMS, [0])
    scheduler.submit([1], PARAMS, [0])
    scheduler.submit([1], PARAMS, [0])
    with pytest.raises(BackendError, match="queue is full"):
        scheduler.submit([1], PARAMS, [0])


prompt_sets = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(1, 23), min_size=0, max_size=12), st.integers(1, 4),
              st.integers(1, 16), st.integers(0, 2**20)),
    min_size=1, max_size=10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt_sets, st.integers(1, 5), st.sampled_from([300, 600, 2048]), st.integers(1, 40),
       st.integers(0, 6), st.integers(0, 3))
def test_prefix_sharing_never_changes_a_sample_and_memory_stays_bounded(
        requests, slots, capacity, chunk, cache_entries, stagger):
    """Random prompt sets built on a few shared stems: whatever was shared, cached, evicted or
    queued, every sample equals the one its request gets alone, and the cells in use never pass
    the cache's size."""
    stems = [list(range(1, 40)), list(range(1, 20)) + [5] * 15, [9, 9, 9], []]
    scheduler, model = make(capacity=capacity, slots=slots, chunk=chunk, cache_entries=cache_entries,
                            cache_cells=capacity // 2, seq_ctx=128)
    submitted = []
    for i, (stem, tail, n, max_tokens, seed) in enumerate(requests):
        tokens = stems[stem] + tail or [1]
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0)
        seeds = [seed + k for k in range(n)]
        submitted.append((tokens, params, seeds, scheduler.submit(tokens, params, seeds)))
        for _ in range(stagger * (i % 2)):
            scheduler.step()
    drain(scheduler, model)
    assert model.peak <= capacity
    for tokens, params, seeds, future in submitted:
        got = [(s.text, s.finish_reason, s.output_tokens) for s in future.result().samples]
        assert got == solo(tokens, params, seeds)
