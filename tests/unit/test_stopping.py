"""Stopping rules on scripted samples, with stopping points worked out by hand."""

import math

import pytest

from apportion import Budget, SamplingOptions, SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.stopping import (
    ESC,
    AnyOf,
    Beta,
    GiveUp,
    RelativeGain,
    Rounds,
    ScoreThreshold,
    leader_stays,
    parse_stop,
)
from apportion.errors import ConfigError
from apportion.lm.scripted import Reply, ScriptedBackend

QUESTION = "What is 40 plus 2?"


def answers(*values):
    return [f"The answer is {v}" for v in values]


def sc(rule, **sampling):
    return SelfConsistency(SelfConsistencyOptions(SamplingOptions(**sampling), stopping=rule))


async def test_esc_stops_at_the_first_window_that_agrees():
    lm = ScriptedBackend(answers(1, 2, 3, 3, 3, 3, 5, 5))
    result = await sc(ESC(window=2)).run(lm, QUESTION, Budget(generations=8))
    # windows of two: (1, 2) differ, (3, 3) agree: stop after 4 of 8
    assert result.stop_reason == "esc" and result.stopped_early and not result.exhausted
    assert result.spent.generations == 4 and result.answer == "3"
    assert [c.params.n for c in lm.calls] == [2, 2]


async def test_without_agreement_the_budget_ends_the_run():
    lm = ScriptedBackend(answers(1, 2, 3, 4, 5, 6))
    result = await sc(ESC(window=3)).run(lm, QUESTION, Budget(generations=6))
    assert result.stop_reason is None and result.exhausted and result.spent.generations == 6


def test_leader_stays_is_the_beta_tail_for_two_answers():
    assert leader_stays([4]) == pytest.approx(1 - 0.5**5)  # Beta(5, 1): P(p > 1/2) = 1 - 1/2^5
    assert leader_stays([3]) == pytest.approx(1 - 0.5**4)
    # Beta(4, 2): P(X > 1/2) = P(Binomial(5, 1/2) <= 3) = 26/32
    assert leader_stays([3, 1]) == pytest.approx(26 / 32)
    three = leader_stays([6, 1, 1])
    assert 0.9 < three < 1 and three == leader_stays([6, 1, 1])  # seeded: the same every time


async def test_beta_stops_when_the_leader_is_safe():
    # rounds of two: 42, 42 -> Beta(3, 1) = 0.875; 42, 42, 42, 42 -> Beta(5, 1) = 0.969 >= 0.95
    lm = ScriptedBackend(answers(42, 42, 42, 42, 7, 7, 7, 7))
    result = await sc(Beta(threshold=0.95)).run(lm, QUESTION, Budget(generations=8))
    assert result.stop_reason == "beta" and result.spent.generations == 4


async def test_relative_gain_stops_when_the_share_settles():
    # rounds of two: shares 1/2 (2), 2/4 (4): a change of 0 < 5%: stop at 4
    lm = ScriptedBackend(answers(1, 2, 1, 3, 1, 1, 1, 1))
    result = await sc(RelativeGain(epsilon=0.05)).run(lm, QUESTION, Budget(generations=8))
    assert result.stop_reason == "relative-gain" and result.spent.generations == 4


async def test_score_can_stop_after_one_sample():
    lm = ScriptedBackend([Reply("The answer is 42", logprob=-0.01), Reply("The answer is 7", logprob=-3.0)])
    algo = BestOfN(BestOfNOptions(SamplingOptions(), stopping=ScoreThreshold(threshold=0.95)))
    result = await algo.run(lm, QUESTION, Budget(generations=8))
    assert result.stop_reason == "score" and result.spent.generations == 1 and result.answer == "42"
    assert math.exp(-0.01) >= 0.95


async def test_give_up_stops_a_question_that_will_not_converge():
    lm = ScriptedBackend(answers(*range(1, 17)))
    rule = parse_stop("beta+give-up")
    result = await sc(rule).run(lm, QUESTION, Budget(generations=16))
    assert result.stop_reason == "give-up" and result.spent.generations == 6


async def test_stopping_respects_the_budget_and_batch_size():
    lm = ScriptedBackend(answers(1, 2, 3, 4, 5))
    result = await sc(ESC(window=4)).run(lm, QUESTION, Budget(generations=5))
    assert [c.params.n for c in lm.calls] == [4, 1] and result.exhausted


def test_parse_and_describe():
    rule = parse_stop("beta:threshold=0.9,round=4+give-up:min-samples=8")
    assert isinstance(rule, AnyOf) and rule.rounds == Rounds(4)
    assert rule.describe() == "beta:threshold=0.9,round=4,draws=4000+give-up:min_samples=8,max_share=0.34,round=2"
    assert parse_stop("esc").rounds == Rounds(4)
    for bad, message in (("magic", "unknown stop rule"), ("esc:window", "key=value"),
                         ("esc:size=3", "key=value"), ("beta:threshold=x", "must be a number"),
                         ("beta:threshold=2", "threshold"), ("esc:window=1", "window")):
        with pytest.raises(ConfigError, match=message):
            parse_stop(bad)


async def test_the_rule_is_recorded_in_the_result():
    result = await sc(ESC(window=2)).run(ScriptedBackend(answers(5)), QUESTION, Budget(generations=8))
    out = result.to_dict()
    assert out["stop_reason"] == "esc" and out["stopped_early"] is True
    assert out["options"]["stopping"] == "esc:window=2"
    assert isinstance(GiveUp().rounds, Rounds)
