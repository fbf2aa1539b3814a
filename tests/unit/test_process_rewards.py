"""The process-reward interface: aggregations, the prefix cache every scorer shares, its failure
rules, and the metered path that charges calls which are not generations."""

import asyncio
import math

import pytest

from apportion.budget.ledger import Ask, Ledger
from apportion.budget.metered_call import Metered, metered_call
from apportion.budget.units import Budget, Price, Usage
from apportion.errors import (
    BackendError,
    BudgetError,
    BudgetExhausted,
    ConfigError,
    ProcessScoringFailed,
    ScoringFailed,
)
from apportion.reward import AGGREGATIONS, PrefixScoreCache, aggregate, score_paths


def test_aggregations():
    assert AGGREGATIONS == ("last", "min", "product", "mean")
    scores = [0.5, 0.8, 0.4]
    assert aggregate(scores) == 0.4
    assert aggregate(scores, "last") == 0.4
    assert aggregate(scores, "min") == 0.4
    assert aggregate(scores, "product") == pytest.approx(0.16)
    assert aggregate(scores, "mean") == pytest.approx(1.7 / 3)


def test_aggregation_needs_its_scores():
    for how in AGGREGATIONS:
        assert aggregate([], how) is None
    assert aggregate([None, 0.7], "last") == 0.7  # only the newest step is needed
    for how in ("min", "product", "mean"):
        assert aggregate([None, 0.7], how) is None
    assert aggregate([0.7, None], "last") is None


def test_unknown_aggregation_is_a_config_error():
    with pytest.raises(ConfigError, match="aggregation must be one of"):
        aggregate([0.5], "max")


def test_cache_keys_by_question_and_steps():
    cache = PrefixScoreCache(max_entries=2)
    cache.put("q", ["a"], 0.5)
    assert cache.lookup("q", ("a",)) == (True, 0.5)
    assert cache.lookup("other question", ["a"]) == (False, None)
    cache.put("q", ["a", "b"], None)  # a definite "no score" is kept
    assert cache.lookup("q", ["a", "b"]) == (True, None)
    cache.put("q", ["c"], 0.1)  # past max_entries the least recently used goes
    assert ("q", ["a"]) not in cache and ("q", ["c"]) in cache
    assert (cache.hits, cache.misses) == (2, 1)


class Counting:
    """score_new for score_paths: each prefix's score is its length / 10, and every call is kept."""

    def __init__(self, fail=()):
        self.calls: list[list[tuple[str, ...]]] = []
        self.fail = dict(fail)

    async def __call__(self, prefixes):
        self.calls.append(prefixes)
        return {p: self.fail.get(p[-1], len(p) / 10) for p in prefixes}


async def test_score_paths_pays_for_new_prefixes_only():
    cache, new = PrefixScoreCache(), Counting()
    first = await score_paths(cache, "q", [["a", "b"], ["a", "c"]], new)
    assert first == [[0.1, 0.2], [0.1, 0.2]]
    assert new.calls == [[("a",), ("a", "b"), ("a", "c")]]  # the shared first step asked once
    second = await score_paths(cache, "q", [["a", "b", "d"], ["a", "c"], []], new)
    assert second == [[0.1, 0.2, 0.3], [0.1, 0.2], []]
    assert new.calls[1] == [("a", "b", "d")]
    await score_paths(cache, "q", [["a", "c"]], new)
    assert len(new.calls) == 2  # all cached: no call at all


async def test_failures_are_not_cached_and_carry_what_was_scored():
    cache = PrefixScoreCache()
    new = Counting(fail={"bad": BackendError("server down")})
    with pytest.raises(ProcessScoringFailed, match="1 of 3 new prefixes: server down") as info:
        await score_paths(cache, "q", [["a", "b"], ["a", "bad"]], new)
    assert isinstance(info.value, ScoringFailed)
    assert info.value.step_scores == [[0.1, 0.2], [0.1, None]]
    assert info.value.scores == [0.2, None] and not info.value.exhausted
    await score_paths(cache, "q", [["a", "bad"]], Counting())
    assert ("q", ["a", "bad"]) in cache  # asked again, and kept once it was scored


async def test_a_refused_budget_raises_budget_exhausted_only_when_nothing_new_was_scored():
    refused = BudgetExhausted("tokens: none left")
    with pytest.raises(BudgetExhausted):
        await score_paths(PrefixScoreCache(), "q", [["a"]], Counting(fail={"a": refused}))
    with pytest.raises(ProcessScoringFailed) as info:
        await score_paths(PrefixScoreCache(), "q", [["a"], ["b"]], Counting(fail={"b": refused}))
    assert info.value.exhausted and info.value.step_scores == [[0.1], [None]]


async def test_a_score_outside_the_unit_interval_is_never_returned():
    with pytest.raises(ProcessScoringFailed, match=r"outside \[0, 1\]"):
        await score_paths(PrefixScoreCache(), "q", [["a"]], Counting(fail={"a": 1.5}))
    with pytest.raises(ProcessScoringFailed, match=r"outside \[0, 1\]"):
        await score_paths(PrefixScoreCache(), "q", [["a"]], Counting(fail={"a": math.nan}))


async def test_a_prefix_the_scorer_left_out_fails():
    async def forgetful(prefixes):
        return {}

    with pytest.raises(ProcessScoringFailed, match="gave no score"):
        await score_paths(PrefixScoreCache(), "q", [["a"]], forgetful)


async def test_bugs_in_a_scorer_are_raised_as_they_are():
    with pytest.raises(ZeroDivisionError):
        await score_paths(PrefixScoreCache(), "q", [["a"]], Counting(fail={"a": ZeroDivisionError("bug")}))


async def test_a_path_must_be_a_sequence_of_strings():
    with pytest.raises(ConfigError, match="not one string"):
        await score_paths(PrefixScoreCache(), "q", ["a step"], Counting())


# -- the metered path for calls that are not generations ------------------------------------------


def test_an_input_only_ask_is_for_scoring_never_for_answers():
    ask = Ask.input_only(100, n=3)
    assert (ask.kind, ask.max_tokens, ask.min_tokens) == ("scorer", 0, 0)
    with pytest.raises(BudgetError, match="invalid ask"):
        Ask.input_only(100, kind="policy")
    with pytest.raises(BudgetError, match="invalid ask"):
        Ask(n=1, max_tokens=0, prompt_tokens=5, kind="scorer")  # min_tokens 1 with no output: a mistake


def test_an_input_only_call_fits_on_its_input_alone():
    ledger = Ledger(Budget(input_tokens=100, output_tokens=5))
    grant = ledger.reserve(Ask.input_only(100, n=4))
    assert grant is not None and grant.n == 4 and grant.worst == Usage(generations=4, input_tokens=100)
    ledger.release(grant)
    assert ledger.reserve(Ask.input_only(101)) is None
    assert ledger.exhausted_reason == "input_tokens: 100 left, not enough for an input of 101 tokens"
    priced = Ledger(Budget(usd=0.001))
    assert priced.reserve(Ask.input_only(1001, price=Price(1.0, 0.0))) is None
    assert priced.exhausted_reason.startswith("usd:")


async def test_metered_call_settles_what_the_call_reports():
    ledger = Ledger(Budget(input_tokens=1000))

    async def call(grant):
        return Metered("value", Usage(generations=2, input_tokens=40), ("a note",))

    assert await metered_call(ledger, Ask.input_only(100, n=2, price=Price(1.0, 0.0)), call, model="prm") == "value"
    spend = ledger.spend()
    assert (spend.input_tokens, spend.scorer_generations, spend.generations, spend.calls) == (40, 2, 0, 1)
    assert spend.usd == pytest.approx(40e-6)
    record = ledger.trace[-1]
    assert (record.kind, record.model, record.notes) == ("scorer", "prm", ("a note",))
    assert ledger.remaining().input_tokens == 960  # the reservation's rest came back


async def test_metered_call_charges_failures_as_a_backend_call_would_be():
    ledger = Ledger(Budget(input_tokens=1000))

    async def unsent(grant):
        raise BackendError("refused connection")

    async def billed(grant):
        raise BackendError("reply cut off", billed=True)

    async def reported(grant):
        raise BackendError("unreadable", consumed=Usage(input_tokens=7))

    with pytest.raises(BackendError):
        await metered_call(ledger, Ask.input_only(100), unsent, model="m")
    assert ledger.spend().input_tokens == 0
    with pytest.raises(BackendError):
        await metered_call(ledger, Ask.input_only(100), billed, model="m")
    assert ledger.spend().input_tokens == 100 and ledger.spend().estimated
    with pytest.raises(BackendError):
        await metered_call(ledger, Ask.input_only(100), reported, model="m")
    assert ledger.spend().input_tokens == 107
    assert ledger.remaining().input_tokens == 893  # nothing left reserved


async def test_metered_call_is_refused_and_cut_off_by_the_budget():
    ledger = Ledger(Budget(input_tokens=10))

    async def call(grant):
        raise AssertionError("never made")

    with pytest.raises(BudgetExhausted, match="input_tokens"):
        await metered_call(ledger, Ask.input_only(11), call, model="m")

    timed = Ledger(Budget(seconds=0.2))

    async def hang(grant):
        await asyncio.sleep(10)

    with pytest.raises(BudgetExhausted, match="deadline"):
        await metered_call(timed, Ask.input_only(50), hang, model="m")
    assert timed.spend().input_tokens == 50 and timed.spend().estimated
