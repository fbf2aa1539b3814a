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
                         ("beta:threshold=2", "threshold"), ("esc:window=1", "window"),
                         ("give-up:round=0", "give-up: round must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            parse_stop(bad)


async def test_the_rule_is_recorded_in_the_result():
    result = await sc(ESC(window=2)).run(ScriptedBackend(answers(5)), QUESTION, Budget(generations=8))
    out = result.to_dict()
    assert out["stop_reason"] == "esc" and out["stopped_early"] is True
    assert out["options"]["stopping"] == "esc:window=2"
    assert isinstance(GiveUp().rounds, Rounds)


# -- deepconf ---------------------------------------------------------------------------------

def confident(value, conf, logprob=-0.1):
    return Reply(f"The answer is {value}", logprob=logprob, confidence=conf)


def test_trace_confidence_is_the_lowest_window_mean():
    from apportion.algorithms.stopping import trace_confidence
    from apportion.result import Candidate

    c = Candidate("t", "1", "1", None, "stop", 6, None, confidences=(5.0, 5.0, 1.0, 0.5, 5.0, 5.0))
    # windows of 2: 5, 3, 0.75, 2.75, 5
    assert trace_confidence(c, 2) == pytest.approx(0.75)
    assert trace_confidence(c, 10) == pytest.approx(21.5 / 6)  # shorter than the window: the mean
    sampled = Candidate("t", "1", "1", None, "stop", 3, None, logprobs=(-0.1, -2.0, -0.1))
    assert trace_confidence(sampled, 2) == pytest.approx(-1.05)
    assert trace_confidence(Candidate("t", "1", "1", None, "stop", 3, None), 2) is None


async def test_deepconf_drops_the_unconfident_and_stops_at_consensus():
    from apportion.algorithms.stopping import DeepConf

    # warmup of 4: 7, 7, 7 at confidence 5 and 3 at 1; keep=0.5 puts the floor at the lower median,
    # 5, so the 3 carries no vote: 7 holds all the weight (1.0 >= 0.95) and sampling stops at 4 of 16
    lm = ScriptedBackend([confident(7, 5.0), confident(7, 5.0), confident(3, 1.0), confident(7, 5.0)])
    rule = DeepConf(warmup=4, keep=0.5, window=2)
    result = await sc(rule).run(lm, QUESTION, Budget(generations=16))
    assert result.stop_reason == "deepconf" and result.spent.generations == 4 and result.answer == "7"
    assert lm.calls[0].params.top_logprobs == 20
    assert result.distribution == {"7": pytest.approx(15.0), "3": 0.0}  # dropped, still listed
    # a plain vote would have gone on: beta at 3 to 1 is 26/32 < 0.95
    assert leader_stays([3, 1]) < 0.95


async def test_deepconf_cuts_later_traces_under_the_warmup_floor():
    from apportion.algorithms.stopping import DeepConf

    # warmup: 7, 3, 7, 3 all at 5 (a tie, no consensus); then the floor is 5 and every later trace
    # whose window mean falls under it is cut: confidences (5, 5, 1, 1) are cut at their 3rd token
    shaky = Reply("so it is The answer is 3", confidence=(5.0, 5.0, 1.0, 1.0, 5.0, 5.0, 5.0))
    lm = ScriptedBackend([confident(7, 5.0), confident(3, 5.0), confident(7, 5.0), confident(3, 5.0),
                          shaky, confident(7, 5.0)])
    result = await sc(DeepConf(warmup=4, round=2, window=2, keep=0.9)).run(lm, QUESTION, Budget(generations=6))
    assert lm.calls[0].params.cut is None and lm.calls[1].params.cut is not None
    cut = [c for c in result.candidates if c.finish_reason == "cut"]
    assert len(cut) == 1 and cut[0].answer is None
    assert result.answer == "7" and result.distribution["7"] == pytest.approx(15.0)
    assert any("cannot stop a sample mid-decode" in n for n in result.notes)


async def test_deepconf_without_logprobs_says_so_and_runs_beta():
    from apportion.algorithms.stopping import DeepConf

    lm = ScriptedBackend(answers(42, 42, 42, 42, 7, 7), logprobs=False)
    result = await sc(DeepConf(round=2)).run(lm, QUESTION, Budget(generations=6))
    assert any("deepconf" in n and "beta" in n for n in result.notes)
    assert result.stop_reason == "beta" and result.spent.generations == 4
    assert lm.calls[0].params.top_logprobs == 0


async def test_deepconf_with_sampled_logprobs_only_says_so():
    from apportion.algorithms.stopping import DeepConf
    from apportion.lm.base import Completion

    class NoTopK(ScriptedBackend):
        async def generate(self, prompt, params, *, deadline=None):
            c = await super().generate(prompt, params, deadline=deadline)
            return Completion(tuple(replace(s, confidences=None) for s in c.samples), c.usage, c.model, c.latency_s)

    from dataclasses import replace
    lm = NoTopK(answers(5, 5, 5, 5))
    result = await sc(DeepConf()).run(lm, QUESTION, Budget(generations=8))
    assert any("sampled tokens' log-probabilities only" in n for n in result.notes)
    assert result.stop_reason == "deepconf" and result.spent.generations == 4


def test_deepconf_parses_and_rounds():
    from apportion.algorithms.stopping import DeepConf

    rule = parse_stop("deepconf:warmup=6,round=3,keep=0.1,consensus=0.9")
    assert isinstance(rule, DeepConf) and rule.keep == 0.1
    assert [rule.rounds.size(i) for i in range(3)] == [6, 3, 3]
    with pytest.raises(ConfigError, match="deepconf"):
        DeepConf(keep=0)


# -- deadlines --------------------------------------------------------------------------------

async def test_no_round_starts_that_would_end_after_the_deadline():
    import time

    # 10-word replies, 0.2 s a call: 100 tokens/s. After round 2 (0.4 s) 0.2 s would be needed
    # with about 0.1 s left: the third round is not started, and the answer comes back flagged.
    words = "one two three four five six seven eight The answer is"
    lm = ScriptedBackend([f"{words} 7", f"{words} 8"], latency_s=0.2)
    started = time.monotonic()
    result = await sc(ESC(window=2)).run(lm, QUESTION, Budget(generations=50, seconds=0.5))
    assert time.monotonic() - started < 0.5
    assert result.stop_reason == "deadline" and result.stopped_early and result.answer is not None
    assert len(lm.calls) == 2
    assert any("would have ended after the deadline" in n for n in result.notes)


async def test_rounds_can_grow_from_one_sample():
    # beta with rounds of 1, 2, 4: 42 | 42 42 -> Beta(4, 1) = 0.9375 < 0.95 | 42 42 42 42 -> Beta(8, 1): stop
    lm = ScriptedBackend(answers(*[42] * 16))
    rule = parse_stop("beta:round=1,growth=2")
    assert rule.describe() == "beta:threshold=0.95,round=1,growth=2.0,draws=4000"
    assert parse_stop("beta").describe() == "beta:threshold=0.95,round=2,draws=4000"  # growth 1: not shown
    result = await sc(rule).run(lm, QUESTION, Budget(generations=16))
    assert [c.params.n for c in lm.calls] == [1, 2, 4] and result.stop_reason == "beta"
    with pytest.raises(ConfigError, match="growth"):
        parse_stop("beta:growth=0.5")
