import asyncio
import math

import pytest

from apportion import (
    BestOfN,
    BestOfNOptions,
    Budget,
    Ledger,
    LLMJudge,
    Price,
    Prompt,
    SamplingOptions,
    SelfCertainty,
    SelfConsistency,
    SelfConsistencyOptions,
    make_algorithm,
)
from apportion.errors import BudgetError, ConfigError
from apportion.lm.scripted import Reply, ScriptedBackend
from apportion.reward.judge import parse_judge_score

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"


def sc(**sampling):
    return SelfConsistency(SelfConsistencyOptions(SamplingOptions(**sampling)))


async def test_self_consistency_majority_over_extracted_answers():
    lm = ScriptedBackend(["The answer is 42.", "It is 42.0 sheep", "The answer is 17.",
                          "I think #### 42", "The answer is 17", "no idea"])
    result = await sc().run(lm, QUESTION, Budget(generations=6))
    assert result.answer == "42"
    assert result.distribution == {"42": 3, "17": 2}
    assert [c.votes for c in result.candidates] == [3, 3, 2, 3, 2, 0]
    assert result.candidates[-1].answer is None
    assert result.final and result.exhausted
    assert result.spent.generations == 6
    assert len(lm.calls) == 1 and lm.calls[0].params.n == 6  # one batched request, not six


async def test_samples_without_answers_never_win():
    lm = ScriptedBackend(["words only", "more words", "still nothing", "The answer is 3"])
    result = await sc().run(lm, QUESTION, Budget(generations=4))
    assert result.answer == "3"
    lm = ScriptedBackend(["words only"])
    result = await sc().run(lm, QUESTION, Budget(generations=3))
    assert result.answer is None and result.response is None and result.distribution == {}


async def test_ties_break_on_confidence_then_first_appearance():
    lm = ScriptedBackend([Reply("The answer is 1", logprob=-2.0), Reply("The answer is 2", logprob=-0.1)])
    result = await sc().run(lm, QUESTION, Budget(generations=2))
    assert result.answer == "2"  # equal votes, the second is more confident
    lm = ScriptedBackend(["The answer is 1", "The answer is 2"], logprobs=False)
    result = await sc(logprobs=False).run(lm, QUESTION, Budget(generations=2))
    assert result.answer == "1"  # equal votes, no confidence: first seen wins


async def test_stream_yields_interim_results_per_batch():
    lm = ScriptedBackend(["The answer is 5"])
    alg = sc(batch_size=2)
    results = [r async for r in alg.stream(lm, QUESTION, Budget(generations=5))]
    assert [len(r.candidates) for r in results] == [2, 4, 5, 5]
    assert [r.final for r in results] == [False, False, False, True]
    assert [c.params.n for c in lm.calls] == [2, 2, 1]


async def test_token_budget_stops_sampling_and_never_exceeds():
    lm = ScriptedBackend(["one two three four five six seven eight nine The answer is 7"])
    budget = Budget(total_tokens=100)
    result = await sc(max_tokens=20, min_tokens=5).run(lm, QUESTION, budget)
    assert result.spent.total_tokens <= 100
    assert result.exhausted and "tokens" in result.exhausted_reason
    assert result.answer == "7"


async def test_seeds_differ_per_call_and_are_reported():
    lm = ScriptedBackend(["The answer is 1"])
    result = await sc(batch_size=2).run(lm, QUESTION, Budget(generations=4), seed=11)
    assert [c.params.seed for c in lm.calls] == [11, 11 + 7919]
    assert result.seed == 11


async def test_dollar_budget_with_a_priced_model():
    lm = ScriptedBackend(["The answer is 9 ok"], price=Price(1_000_000, 1_000_000))  # $1 a token
    prompt_tokens = await lm.prompt_tokens(Prompt.chat(QUESTION, system=SamplingOptions().system_prompt))
    budget = Budget(usd=prompt_tokens + 3 * 5)
    result = await sc(max_tokens=5, min_tokens=5).run(lm, QUESTION, budget)
    assert result.spent.usd <= budget.usd
    assert result.spent.generations == 3
    assert float(result.spent.usd) == prompt_tokens + 3 * 5


async def test_dollar_budget_on_a_free_model_is_refused():
    for budget in (Budget(usd=1), Budget(usd=1, generations=4)):
        with pytest.raises(BudgetError, match="no price"):
            await sc().run(ScriptedBackend(["x"]), QUESTION, budget)


async def test_deadline_stops_a_slow_backend():
    lm = ScriptedBackend(["The answer is 4"], latency_s=0.15)
    result = await sc(batch_size=1).run(lm, QUESTION, Budget(seconds=0.5))
    assert result.answer == "4"
    # calls take 0.15 s: after the third (0.45 s) a fourth would end past the deadline, so it is not
    # started, and the answer comes back flagged as stopped by the deadline
    assert result.stop_reason == "deadline" and not result.exhausted
    assert result.spent.seconds < 0.5
    assert 2 <= result.spent.generations <= 3


async def test_nested_ledger_spend_rolls_up():
    parent = Ledger(Budget(generations=6))
    lm = ScriptedBackend(["The answer is 8"])
    first = await sc().run(lm, QUESTION, parent.child(Budget(generations=4)))
    second = await sc().run(lm, QUESTION, parent.child(Budget(generations=4)))
    assert first.spent.generations == 4 and second.spent.generations == 2
    assert parent.spend().generations == 6
    assert len(parent.trace) == 2


async def test_best_of_n_picks_highest_self_certainty():
    lm = ScriptedBackend([Reply("The answer is 1", logprob=-1.0), Reply("The answer is 2", logprob=-0.2),
                          Reply("The answer is 1", logprob=-0.9), Reply("no answer", logprob=-0.01)])
    result = await BestOfN().run(lm, QUESTION, Budget(generations=4))
    assert result.answer == "2"
    assert result.response == "The answer is 2"
    assert result.candidates[1].score == pytest.approx(math.exp(-0.2))
    assert result.candidates[3].score == pytest.approx(math.exp(-0.01))  # scored, but cannot win


async def test_weighted_best_of_n_sums_scores_per_answer():
    lm = ScriptedBackend([Reply("The answer is 1", logprob=-1.0), Reply("The answer is 2", logprob=-0.2),
                          Reply("The answer is 1", logprob=-0.5)])
    result = await BestOfN(BestOfNOptions(weighted=True)).run(lm, QUESTION, Budget(generations=3))
    assert result.algorithm == "weighted-best-of-n"
    assert result.answer == "1"  # e^-1 + e^-0.5 = 0.97 > e^-0.2 = 0.82
    assert result.distribution["1"] == pytest.approx(math.exp(-1.0) + math.exp(-0.5))
    plain = await BestOfN().run(ScriptedBackend(lm.replies), QUESTION, Budget(generations=3))
    assert plain.answer == "2"


async def test_self_certainty_needs_logprobs():
    lm = ScriptedBackend(["The answer is 1"], logprobs=False)
    with pytest.raises(ConfigError, match="log-probabilities"):
        await BestOfN(scorer=SelfCertainty()).run(lm, QUESTION, Budget(generations=2))


def judge_script(prompt, params, call, i):
    content = prompt.messages[-1].content
    if "Proposed solution" in content:
        return "Score: 9" if "answer is 42" in content else "Rating: 2/10"
    return ["The answer is 41", "The answer is 42", "The answer is 41"][i % 3]


async def test_best_of_n_with_judge_charges_judge_spend():
    lm = ScriptedBackend(judge_script)
    budget = Budget(generations=3, total_tokens=10_000)
    result = await BestOfN(scorer=LLMJudge()).run(lm, QUESTION, budget)
    assert result.answer == "42"
    assert [c.score for c in result.candidates] == [0.2, 0.9, 0.2]
    assert result.spent.generations == 3
    # the judge saw two distinct texts: judged once each, charged as scoring
    assert result.spent.scorer_generations == 2
    kinds = [r.kind for r in result.trace]
    assert kinds == ["policy", "scorer", "scorer"]
    assert result.spent.input_tokens == sum(r.usage.input_tokens for r in result.trace)


async def test_judge_with_exhausted_budget_falls_back_to_votes():
    lm = ScriptedBackend(judge_script)
    prompt_tokens = await lm.prompt_tokens(Prompt.chat(QUESTION, system=SamplingOptions().system_prompt))
    budget = Budget(total_tokens=prompt_tokens + 3 * 4)  # room for the samples, none for judging
    result = await BestOfN(BestOfNOptions(SamplingOptions(max_tokens=4, min_tokens=4)),
                           scorer=LLMJudge()).run(lm, QUESTION, budget)
    assert result.answer == "41"
    assert all(c.score is None for c in result.candidates)
    assert any("fell back to majority" in n for n in result.notes)
    assert result.spent.total_tokens <= budget.total_tokens


@pytest.mark.parametrize("text, score", [
    ("Score: 7", 0.7), ("score = 10", 1.0), ("**Score:** 3", 0.3), ("Rating: 8/10", 0.8),
    ("I'd give it 4 out of 5", 0.8), ("9", 0.9), ("The solution is incorrect.", 0.0),
    ("This is correct", 1.0), ("Score: 15", 1.0), ("hmm", None),
])
def test_judge_score_parsing(text, score):
    assert parse_judge_score(text) == (None if score is None else pytest.approx(score))


def test_registry_names_and_errors():
    assert make_algorithm("sc").name == "self-consistency"
    assert make_algorithm("weighted-best-of-n").name == "weighted-best-of-n"
    with pytest.raises(ConfigError, match="unknown algorithm 'magic'"):
        make_algorithm("magic")


def test_bad_options_are_named():
    with pytest.raises(ConfigError, match="temperature"):
        SamplingOptions(temperature=-1)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingOptions(max_tokens=0)


async def test_empty_prompt_is_refused():
    with pytest.raises(ConfigError, match="empty"):
        await sc().run(ScriptedBackend(["x"]), "   ", Budget(generations=1))


def test_run_sync_works_inside_a_running_loop():
    lm = ScriptedBackend(["The answer is 6"])

    async def notebook_cell():
        return sc().run_sync(lm, QUESTION, Budget(generations=2))

    result = asyncio.run(notebook_cell())
    assert result.answer == "6"
    assert sc().run_sync(lm, QUESTION, Budget(generations=1)).answer == "6"
