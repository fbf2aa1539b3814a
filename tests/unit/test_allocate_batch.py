"""One total budget over many prompts: policies, the parent ledger, round barriers."""

from __future__ import annotations

import asyncio
import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.allocate.difficulty import AgreementEstimator, Evidence
from apportion.allocate.engine import answer_batch
from apportion.allocate.policies import POLICIES, BinStrategy, StrategyTable, make_policy
from apportion.batch import Item
from apportion.budget.ledger import Ask, Ledger
from apportion.budget.units import Budget, Price, Usage
from apportion.errors import BudgetError, ConfigError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.scripted import ScriptedBackend

SAMPLING = SamplingOptions(max_tokens=12, min_tokens=1, system_prompt="Answer.")


def _question_replies(answers: dict[str, list[str]]):
    """Replies per question: each question's answers cycled in order, sample by sample."""
    served: dict[str, int] = {}

    def reply(prompt: Prompt, params: SamplingParams, call: int, index: int) -> str:
        question = prompt.messages[-1].content
        n = served.get(question, 0)
        served[question] = n + 1
        pool = answers[question]
        return f"so the answer is {pool[n % len(pool)]}"
    return reply


def _items(questions: list[str]) -> list[Item]:
    return [Item(i + 1, i + 1, q) for i, q in enumerate(questions)]


def _run(questions: dict[str, list[str]], total: Budget, policy: str, *, concurrency: int = 4, probe: int = 2,
         horizon: int = 16, table: StrategyTable | None = None, price: Price | None = None):
    backend = ScriptedBackend(_question_replies(questions), price=price or Price())
    chosen = make_policy(policy, window=concurrency, probe=probe, horizon=horizon, table=table)
    return asyncio.run(answer_batch(
        _items(list(questions)), backend, total, chosen, lambda name: make_algorithm(name, SAMPLING),
        max_tokens=SAMPLING.max_tokens, system_prompt=SAMPLING.system_prompt, concurrency=concurrency, seed=0,
        max_samples=horizon))


EASY, SPLIT, SCATTERED = "easy question", "split question", "scattered question"
QUESTIONS = {
    EASY: ["4"],
    SPLIT: ["7", "9", "7", "7", "9", "7", "7", "9", "7", "7", "9", "7", "7", "9", "7", "7"],
    SCATTERED: [str(n) for n in range(100, 116)],
}


def test_marginal_gain_gives_the_contested_question_the_budget_and_the_settled_one_nothing_more():
    """Known by hand: two probes settle EASY (4, 4) and leave SPLIT at one vote each (7, 9): more
    samples can change only SPLIT's vote, so all of the rest goes there."""
    result = _run({EASY: QUESTIONS[EASY], SPLIT: QUESTIONS[SPLIT]}, Budget(generations=8), "marginal-gain")
    drawn = {o.item.prompt: o.result.spent.generations for o in result.outcomes}
    assert drawn == {EASY: 2, SPLIT: 6}
    assert {o.item.prompt: o.result.answer for o in result.outcomes} == {EASY: "4", SPLIT: "7"}
    uniform = _run({EASY: QUESTIONS[EASY], SPLIT: QUESTIONS[SPLIT]}, Budget(generations=8), "uniform")
    assert [o.result.spent.generations for o in uniform.outcomes] == [4, 4]


def test_uniform_shares_evenly_and_passes_on_what_a_prompt_leaves():
    result = _run({f"q{i}": ["1"] for i in range(4)}, Budget(generations=10), "uniform", concurrency=1)
    assert [o.result.spent.generations for o in result.outcomes] == [3, 2, 3, 2]  # 10/4 rounds to 3, then 7/3, 5/2, 2
    front = _run({f"q{i}": ["1"] for i in range(4)}, Budget(generations=12), "front-load", concurrency=1)
    back = _run({f"q{i}": ["1"] for i in range(4)}, Budget(generations=12), "back-load", concurrency=1)
    def drawn(result):
        return [o.result.spent.generations if o.result else 0 for o in result.outcomes]
    assert drawn(front) == [6, 4, 2, 0]  # twice the even share each time: the last gets nothing
    assert drawn(back) == [2, 2, 2, 6]
    assert [o.status for o in front.outcomes][-1] == "nothing drawn"


def test_uniform_with_a_token_total_gives_each_prompt_an_even_share_in_tokens():
    result = _run({f"q{i}": ["1"] for i in range(4)}, Budget(total_tokens=400), "uniform", concurrency=4)
    spent = [o.result.spent.input_tokens + o.result.spent.output_tokens for o in result.outcomes]
    assert all(s <= 100 for s in spent) and sum(spent) <= 400
    assert len(set(spent)) == 1


def test_decisions_do_not_depend_on_concurrency():
    one = _run(QUESTIONS, Budget(total_tokens=900), "compute-optimal", concurrency=1)
    many = _run(QUESTIONS, Budget(total_tokens=900), "compute-optimal", concurrency=8)
    def decided(result):
        return [(o.result.answer, o.result.spent.generations, o.result.spent.input_tokens,
                 o.result.spent.output_tokens, o.allocation) for o in result.outcomes]
    assert decided(one) == decided(many)


def test_a_strategy_table_sets_each_bins_algorithm_and_resumes_from_the_probe():
    table = StrategyTable((BinStrategy("best-of-n"), BinStrategy("self-consistency")), (0.5,))
    result = _run(QUESTIONS, Budget(generations=18), "compute-optimal", table=table)
    by_question = {o.item.prompt: o for o in result.outcomes}
    assert by_question[EASY].allocation["bin"] == 0
    assert by_question[SPLIT].allocation["bin"] == 1
    assert by_question[SPLIT].result.algorithm == "self-consistency"
    # SPLIT kept its probe samples: every candidate it drew is in its result
    assert len(by_question[SPLIT].result.candidates) == by_question[SPLIT].result.spent.generations


def test_report_sums_per_bin_to_the_total():
    result = _run(QUESTIONS, Budget(total_tokens=700), "difficulty-bins")
    report = result.report()
    assert sum(b["tokens"] for b in report["per_bin"].values()) == \
        result.spent.input_tokens + result.spent.output_tokens
    assert {p["line"] for p in report["prompts"]} == {1, 2, 3}


def test_a_budget_below_one_probe_each_serves_the_first_prompts_and_says_so():
    result = _run({f"q{i}": ["1"] for i in range(5)}, Budget(generations=3), "marginal-gain")
    drawn = [o.result.spent.generations if o.result else 0 for o in result.outcomes]
    assert sum(drawn) == 3 and drawn[:3] == [1, 1, 1]
    assert any("below one probe" in n for n in result.notes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(POLICIES), n=st.integers(1, 6), seed=st.integers(0, 10_000),
       unit=st.sampled_from(["generations", "total_tokens", "output_tokens", "usd"]),
       per_question=st.floats(0.5, 12), concurrency=st.integers(1, 5), probe=st.integers(1, 3))
def test_the_total_is_never_exceeded(policy, n, seed, unit, per_question, concurrency, probe):
    rng = random.Random(seed)
    questions = {f"question {i}": [" ".join(["w"] * rng.randint(0, 10)) + f" {rng.randint(1, 3)}"
                                   for _ in range(rng.randint(1, 6))] for i in range(n)}
    scale = {"generations": 1, "total_tokens": 20, "output_tokens": 10, "usd": 0.00002}[unit]
    amount = per_question * n * scale
    total = Budget(**{unit: amount if unit == "usd" else max(1, int(amount))})
    result = _run(questions, total, policy, concurrency=concurrency, probe=probe, price=Price.parse("1,1"))
    s = result.spent
    used = {"generations": s.generations, "total_tokens": s.input_tokens + s.output_tokens,
            "output_tokens": s.output_tokens, "usd": s.usd}[unit]
    limit = Fraction(repr(amount)) if unit == "usd" else total.to_dict()[unit]
    assert used <= limit
    # the parts add up to the whole: nothing spent outside a prompt's child ledger
    assert sum(o.result.spent.generations for o in result.outcomes if o.result) == s.generations


def test_top_up_raises_limits_and_refuses_to_undo_spend():
    parent = Ledger(Budget(generations=10))
    child = parent.child(Budget(generations=2))
    grant = child.reserve(Ask(2, 5, 3))
    assert grant is not None
    child.settle(grant, Usage(2, 3, 8))
    assert child.reserve(Ask(1, 5, 3)) is None and child.exhausted
    child.top_up(Budget(generations=4))
    assert not child.exhausted and child.remaining().generations == 2
    with pytest.raises(BudgetError, match="already spent"):
        child.top_up(Budget(generations=1))


def test_estimator_tells_settled_split_and_scattered_apart():
    est = AgreementEstimator()
    settled, split, scattered = (est.estimate(Evidence(c, 0), 8) for c in ((4,), (2, 2), (1, 1, 1, 1)))
    assert settled.curve[0] > split.curve[0] > scattered.curve[0]
    assert settled.curve[8] - settled.curve[0] < 0.01  # more samples cannot help a settled vote
    assert 0 <= settled.low <= settled.curve[0] <= settled.high <= 1
    assert est.estimate(Evidence((2, 2), 0), 8) == split  # the same evidence, the same curve


def test_bad_policy_inputs_are_named():
    with pytest.raises(ConfigError, match="unknown policy"):
        make_policy("greedy-ish")
    with pytest.raises(ConfigError, match="edges"):
        StrategyTable((BinStrategy(), BinStrategy()), (0.1, 0.2))
    with pytest.raises(ConfigError, match="algorithm"):
        StrategyTable.from_dict({"bins": [{"algo": "sc"}]})


def test_think_routing_answers_easy_prompts_directly_and_reasons_on_the_rest():
    from apportion.algorithms.registry import DIRECT_SYSTEM_PROMPT
    from apportion.allocate.policies import ThinkRoute

    direct_calls: list[str] = []

    def reply(prompt: Prompt, params: SamplingParams, call: int, index: int) -> str:
        question = prompt.messages[-1].content
        if prompt.messages[0].content == DIRECT_SYSTEM_PROMPT:
            direct_calls.append(question)
            return "The answer is 4" if question == EASY else f"The answer is {index + 1}"
        return "working it out step by step, so the answer is 7"

    backend = ScriptedBackend(reply)
    policy = make_policy("marginal-gain", probe=2, horizon=16, think=ThinkRoute(keep_votes=False))
    result = asyncio.run(answer_batch(
        _items([EASY, SPLIT]), backend, Budget(generations=10), policy, lambda name: make_algorithm(name, SAMPLING),
        max_tokens=SAMPLING.max_tokens, system_prompt=SAMPLING.system_prompt, seed=0, max_samples=16))
    easy, hard = result.outcomes
    assert easy.allocation["routed"] == "direct" and easy.result.spent.generations == 2
    assert easy.result.answer == "4"
    assert "routed" not in hard.allocation and hard.allocation["algorithm"] == "self-consistency"
    assert hard.result.spent.generations > 2 and hard.result.answer == "7"
    # the direct probe is paid for but no longer votes once the prompt reasons
    assert len(hard.result.candidates) == hard.result.spent.generations - 2
    assert sorted(set(direct_calls)) == [EASY, SPLIT]  # only the probe was direct
    with pytest.raises(ConfigError, match="probe"):
        make_policy("uniform", think=ThinkRoute())


def test_a_deadline_ends_the_batch_with_what_was_drawn():
    import time

    backend = ScriptedBackend(_question_replies({f"q{i}": ["1", "2", "1"] for i in range(4)}), latency_s=0.05)
    policy = make_policy("marginal-gain", probe=2, horizon=64)
    started = time.monotonic()
    result = asyncio.run(answer_batch(
        _items([f"q{i}" for i in range(4)]), backend, Budget(seconds=0.6), policy,
        lambda name: make_algorithm(name, SAMPLING), max_tokens=SAMPLING.max_tokens,
        system_prompt=SAMPLING.system_prompt, seed=0, max_samples=64))
    assert time.monotonic() - started < 1.5
    assert all(o.result is not None and o.result.answer == "1" for o in result.outcomes)
    assert result.spent.seconds <= 0.6 + 0.3  # the last call may overrun the deadline by its own latency


@pytest.mark.parametrize("policy", ["uniform", "marginal-gain", "equal-samples"])
def test_a_batch_of_programs_never_runs_more_tool_calls_than_the_total(policy):
    program = "Here is the program:\n```python\nprint(6 * 7)\n```"
    backend = ScriptedBackend([program])
    result = asyncio.run(answer_batch(
        _items(["q one", "q two", "q three"]), backend, Budget(generations=12, tool_calls=5),
        make_policy(policy, probe=1, horizon=8), lambda name: make_algorithm(name, SAMPLING),
        algorithm="program-aided", max_tokens=SAMPLING.max_tokens, system_prompt=SAMPLING.system_prompt, seed=0,
        max_samples=8))
    assert result.spent.tool_calls <= 5 and result.spent.generations <= 12
    assert sum(o.result.spent.tool_calls for o in result.outcomes if o.result) == result.spent.tool_calls
    assert all(o.result.answer == "42" for o in result.outcomes if o.result and o.result.candidates)
