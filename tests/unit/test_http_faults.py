"""The HTTP path against a server that misbehaves below the HTTP layer (tests/..., bench/faults):
whatever it does, no limit is passed by the engine, nothing the server billed goes uncharged,
and a run that drew anything returns it.

The property test runs 150 cases in the suite; ``PROPERTY_EXAMPLES=10000 pytest
tests/unit/test_http_faults.py -k no_fault`` is the long run (about 11 minutes here).
"""

import asyncio
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion import (
    BestOfN,
    BestOfNOptions,
    Budget,
    HTTPOptions,
    LLMJudge,
    OpenAIHTTPBackend,
    Price,
    SamplingOptions,
    SelfConsistency,
    SelfConsistencyOptions,
)
from apportion.bench.faults.server import FAULTS, FaultServer
from apportion.errors import RunFailed
from tests.conftest import examples

QUESTION = "What is 40 plus 2?"
EXAMPLES = examples(150)
TIMEOUT_S = 0.15


@pytest.fixture(scope="module")
def server():
    with FaultServer(drip_interval_s=0.02) as s:
        yield s


def reset(server: FaultServer, script: list[str]) -> None:
    from apportion.bench.faults.server import Billing

    server.script = list(script)
    server.billing = Billing()


def backend(server: FaultServer, price: Price = Price()) -> OpenAIHTTPBackend:  # noqa: B008
    return OpenAIHTTPBackend(HTTPOptions(base_url=server.base_url, model=server.model, price=price,
                                         timeout_s=TIMEOUT_S, connect_timeout_s=1.0, backoff_s=0.001,
                                         max_backoff_s=0.01, max_retries=2))


def run(algorithm, lm, budget):
    async def go():
        try:
            try:
                return await algorithm.run(lm, QUESTION, budget, seed=1)
            except RunFailed as exc:
                return exc.result
        finally:
            await lm.aclose()

    return asyncio.run(go())


@st.composite
def budgets(draw):
    limits = {
        "generations": st.integers(1, 12),
        "input_tokens": st.integers(1, 400),
        "output_tokens": st.integers(1, 400),
        "total_tokens": st.integers(1, 800),
        "usd": st.sampled_from([0.0002, 0.0005, 0.002]),
        "seconds": st.sampled_from([0.3, 1.0]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=4, unique=True))
    return Budget(**{name: draw(limits[name]) for name in chosen})


def make(name: str, sampling: SamplingOptions):
    if name == "self-consistency":
        return SelfConsistency(SelfConsistencyOptions(sampling))
    if name == "best-of-n-judge":
        return BestOfN(BestOfNOptions(sampling), scorer=LLMJudge())
    return BestOfN(BestOfNOptions(sampling))


@pytest.mark.timeout(max(600, EXAMPLES))  # about 0.1 s a case; the long run must not hit the default limit
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    budget=budgets(),
    faults=st.lists(st.sampled_from(FAULTS), max_size=10),
    algorithm=st.sampled_from(["self-consistency", "best-of-n", "best-of-n-judge"]),
    price=st.builds(Price, st.sampled_from([0.5, 10.0]), st.sampled_from([1.0, 30.0])),
    max_tokens=st.integers(1, 40),
    batch_size=st.one_of(st.none(), st.integers(1, 4)),
    logprobs=st.booleans(),
)
def test_no_fault_makes_the_engine_overspend_or_undercharge(server, budget, faults, algorithm, price, max_tokens,
                                                             batch_size, logprobs):
    reset(server, faults)
    logprobs = logprobs or algorithm == "best-of-n"  # self-certainty needs them
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=1, batch_size=batch_size, logprobs=logprobs)
    started = time.monotonic()
    result = run(make(algorithm, sampling), backend(server, price), budget)
    wall = time.monotonic() - started
    spent, billed = result.spent, server.billing

    assert spent.violations(budget) == []
    if budget.seconds is not None:
        assert wall <= budget.seconds + 0.5  # a call is cut at the deadline, plus its grace
    # what the server generated is charged: exactly where nothing had to be estimated
    assert spent.input_tokens >= billed.prompt_tokens
    assert spent.output_tokens >= billed.completion_tokens
    if not spent.estimated:
        assert (spent.input_tokens, spent.output_tokens) == (billed.prompt_tokens, billed.completion_tokens)
    assert spent.usd == price.cost(spent.input_tokens, spent.output_tokens)
    # only the server forces spend past a reservation, and only by generating more than asked
    if spent.overrun.calls:
        assert {"long", "extra"} & set(faults)
    # every sample the engine received and kept is a candidate; none is lost
    assert len(result.candidates) == spent.generations <= billed.samples_delivered
    if result.candidates:
        assert result.answer is not None or all(c.answer is None for c in result.candidates)
    else:
        assert result.answer is None


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_alone_is_survived(server, fault):
    reset(server, [fault])
    budget = Budget(generations=4)
    result = run(SelfConsistency(), backend(server), budget)
    assert result.answer == "42" or result.answer in {"41", "7"}
    assert result.error is None and result.spent.generations == 4
    assert result.spent.violations(budget) == []
    assert result.spent.output_tokens >= server.billing.completion_tokens


def test_a_hanging_server_is_bounded_by_the_timeout_and_charged():
    with FaultServer(script=["hang"] * 10) as hanging:
        lm = OpenAIHTTPBackend(HTTPOptions(base_url=hanging.base_url, model=hanging.model, timeout_s=0.3))
        started = time.monotonic()
        result = run(SelfConsistency(), lm, Budget(generations=2))
        elapsed = time.monotonic() - started
    assert result.answer is None and "no complete reply within 0.3 s" in result.error
    assert elapsed < 2 * 0.3 + 0.5  # two timeouts, then the call gives up
    assert result.spent.estimated and result.spent.output_tokens == 2 * 2 * 512


def test_a_deadline_cuts_a_hanging_call_and_keeps_the_samples_before_it():
    with FaultServer(script=["ok", "hang"]) as hanging:
        lm = OpenAIHTTPBackend(HTTPOptions(base_url=hanging.base_url, model=hanging.model))
        sampling = SamplingOptions(batch_size=2, max_tokens=64)
        started = time.monotonic()
        result = run(SelfConsistency(SelfConsistencyOptions(sampling)), lm, Budget(seconds=1.0))
        elapsed = time.monotonic() - started
    assert result.answer is not None and len(result.candidates) == 2 and result.error is None
    assert result.exhausted and result.exhausted_reason.startswith("seconds")
    assert elapsed < 1.0 + 0.4
    hung = result.trace[-1]
    assert hung.usage.estimated and hung.usage.output_tokens == 2 * 64  # its worst case, not nothing


def test_one_transient_short_reply_does_not_cost_the_rest_of_the_run(server):
    reset(server, ["short"] + ["ok"] * 50)
    lm = backend(server)

    async def many():
        try:
            return [await SelfConsistency().run(lm, QUESTION, Budget(generations=8)) for _ in range(10)]
        finally:
            await lm.aclose()

    results = asyncio.run(many())
    assert all(r.spent.generations == 8 for r in results)
    # ten questions: ten requests, plus what makes up the short reply (a random count below 8): one
    # request for the rest where it had several choices, one per sample where it had one
    short = results[0].trace[0].usage.generations
    assert 1 <= short < 8
    assert server.billing.requests == 10 + (1 if short > 1 else 7) and lm.capabilities.native_n
    assert [r.n_granted for r in results[0].trace[1:]] == ([8 - short] if short > 1 else [1] * 7)


def test_a_server_that_ignores_n_is_found_out_and_probed_again(server):
    from apportion.lm.n_support import FIRST_PROBE, IGNORED_AFTER

    reset(server, ["one"] * 100)  # every request answered with one choice, as llama.cpp's server does
    lm = backend(server)

    async def one_run() -> int:
        before = server.billing.requests
        await SelfConsistency().run(lm, QUESTION, Budget(generations=8))
        return server.billing.requests - before

    async def go():
        try:
            # each run: n=8 answered with one choice, the other seven at once, one request each;
            # found out after IGNORED_AFTER such runs
            for _ in range(IGNORED_AFTER):
                assert lm.capabilities.native_n
                assert await one_run() == 1 + 7
            assert not lm.capabilities.native_n
            assert await one_run() == 8
            server.script = []  # the server honours n again
            runs = 0
            while not lm.capabilities.native_n or runs == 0:
                runs += 1
                await one_run()
                assert runs <= FIRST_PROBE // 8 + 1
            assert await one_run() == 1
        finally:
            await lm.aclose()

    asyncio.run(go())
