"""Planning: the plan read from the model's list, the budget split exactly among the approaches
(the plan one generation of it), the fallback without a plan, the answer chosen by the base's
votes or scores pooled over the approaches, and the budget held in every unit."""

import asyncio
import zlib
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.beam_search import BeamSearch, BeamSearchOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.particle_filtering import ParticleFiltering, ParticleFilteringOptions
from apportion.algorithms.planning import (
    Planning,
    PlanningOptions,
    chain_left,
    parse_plan,
    pooled_choice,
    split_budget,
    with_instruction,
)
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.steps import StepOptions
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger, Remaining
from apportion.budget.units import Budget, Price, to_fraction
from apportion.errors import ConfigError
from apportion.lm.base import Prompt
from apportion.lm.scripted import ScriptedBackend
from apportion.result import Candidate
from tests.conftest import examples
from tests.unit.test_search import QUESTION, STEP_TEXTS, TableScorer, budgets, random_tree, tree_backend

PLAN = "Here are some approaches:\n1. Multiply directly.\n2. Add 6 seven times.\n3. Use a times table.\n"


def user_of(prompt: Prompt) -> str:
    return [m.content for m in prompt.messages if m.role == "user"][-1] if prompt.is_chat else prompt.text or ""


def is_plan(prompt: Prompt) -> bool:
    return user_of(prompt).startswith("List ")


def scripted(plan: str = PLAN, answers=None, **kwargs) -> ScriptedBackend:
    """The plan for the plan request; for an approach's request, ``answers[approach]`` (cycled by
    sample), "The answer is 7." without one."""
    answers = answers or {}

    def reply(prompt, params, call, i):
        if is_plan(prompt):
            return plan
        user = user_of(prompt)
        for approach, replies in answers.items():
            if user.endswith(f"Use this approach: {approach}"):
                return replies[i % len(replies)]
        return "The answer is 7."

    return ScriptedBackend(reply, **kwargs)


def run(algorithm, backend, budget, **kwargs):
    return asyncio.run(algorithm.run(backend, QUESTION, budget, seed=1, **kwargs))


def approach_calls(backend: ScriptedBackend) -> list[tuple[str, int]]:
    """(the approach in the prompt, n) of every call but the plan's."""
    out = []
    for call in backend.calls:
        if not is_plan(call.prompt):
            user = user_of(call.prompt)
            approach = user.split("Use this approach: ", 1)[1] if "Use this approach: " in user else ""
            out.append((approach, call.params.n))
    return out


# -- the plan and the split -----------------------------------------------------------------------


def test_the_plan_is_one_generation_and_the_rest_is_split_exactly_among_the_approaches():
    lm = scripted()
    result = run(Planning(SelfConsistency()), lm, Budget(generations=8))

    plan_call = lm.calls[0]
    assert is_plan(plan_call.prompt) and plan_call.params.n == 1 and QUESTION in user_of(plan_call.prompt)
    # 7 generations left: 3, 2, 2 (steps.split), each approach in its own prompt
    assert sorted(approach_calls(lm)) == [("Add 6 seven times.", 2), ("Multiply directly.", 3),
                                          ("Use a times table.", 2)]
    assert all(user_of(c.prompt).startswith(QUESTION) for c in lm.calls[1:])
    assert all(c.prompt.messages[0].role == "system" for c in lm.calls[1:])  # the base's system prompt kept
    assert result.spent.generations == 8 and result.spent.planning_generations == 1
    assert len(result.candidates) == 7 and result.answer == "7"
    assert [r.kind for r in result.trace].count("planning") == 1
    assert result.algorithm == "planning" and result.exhausted
    assert any(n.startswith("plan: 3 of 3 approaches asked for: 1. Multiply directly.") for n in result.notes)
    assert result.options["base"] == "self-consistency" and result.options["approaches"] == 3


def test_the_answer_is_the_vote_pooled_over_the_approaches_never_the_longest_answer():
    # the first approach alone says 41 three times; the other two say 42 twice each, tersely
    long = "Let us multiply six by seven carefully, step by step, checking twice. The answer is 41."
    lm = scripted(answers={"Multiply directly.": [long], "Add 6 seven times.": ["42."],
                           "Use a times table.": ["The answer is 42."]})
    result = run(Planning(SelfConsistency()), lm, Budget(generations=8))
    assert result.answer == "42" and result.distribution == {"42": 4, "41": 3}
    assert result.response in ("42.", "The answer is 42.")
    assert {c.answer: c.votes for c in result.candidates} == {"41": 3, "42": 4}


def test_fewer_approaches_than_asked_share_the_budget_between_them():
    lm = scripted("1. Multiply directly.\n2) Multiply  directly!\n3. Add 6 seven times.")
    result = run(Planning(SelfConsistency(), PlanningOptions(approaches=4)), lm, Budget(generations=8))
    assert sorted(approach_calls(lm)) == [("Add 6 seven times.", 3), ("Multiply directly.", 4)]
    assert result.spent.generations == 8
    assert any("plan: 2 of 4 approaches" in n for n in result.notes)


def test_a_plan_without_a_list_falls_back_to_the_base_alone():
    lm = scripted("I would simply compute the product.")
    result = run(Planning(SelfConsistency()), lm, Budget(generations=6))
    assert approach_calls(lm) == [("", 5)]  # the question as it was, with all that is left
    assert result.spent.generations == 6 and len(result.candidates) == 5
    assert any("no numbered approaches" in n and "without a plan" in n for n in result.notes)


def test_one_generation_leaves_no_room_for_a_plan():
    lm = scripted()
    result = run(Planning(SelfConsistency()), lm, Budget(generations=1))
    assert approach_calls(lm) == [("", 1)] and not any(is_plan(c.prompt) for c in lm.calls)
    assert result.spent.generations == 1 and result.spent.planning_generations == 0
    assert any("no plan" in n for n in result.notes)


def test_a_plan_the_budget_cannot_pay_for_falls_back_and_costs_no_generation():
    lm = scripted()
    options = PlanningOptions(plan_tokens=64)
    result = run(Planning(SelfConsistency(), options), lm, Budget(generations=4, output_tokens=8))
    assert not any(is_plan(c.prompt) for c in lm.calls)
    assert result.spent.planning_generations == 0 and result.spent.generations == len(result.candidates)
    assert any(n.startswith("no plan (") for n in result.notes)


def test_fewer_generations_than_approaches_run_fewer_approaches():
    lm = scripted()
    result = run(Planning(SelfConsistency()), lm, Budget(generations=3))
    assert sorted(approach_calls(lm)) == [("Add 6 seven times.", 1), ("Multiply directly.", 1)]
    assert result.spent.generations == 3
    assert any("pays for 2 of 3 approaches" in n for n in result.notes)


def test_token_and_dollar_limits_are_split_exactly():
    left = Remaining(generations=7, input_tokens=None, output_tokens=100, total_tokens=None, usd=Fraction(1, 10),
                     seconds=30.0, tool_calls=None)
    parts = split_budget(left, 3)
    assert [p.generations for p in parts] == [3, 2, 2]
    assert [p.output_tokens for p in parts] == [34, 33, 33]
    assert all(p.seconds == 30.0 and p.input_tokens is None for p in parts)
    assert sum(to_fraction(p.usd) for p in parts) <= Fraction(1, 10)
    assert Fraction(1, 10) - sum(to_fraction(p.usd) for p in parts) < Fraction(1, 10**15)
    # a unit with fewer whole units than parts runs fewer parts; none left, none
    assert len(split_budget(Remaining(2, None, None, None, None, None), 3)) == 2
    assert split_budget(Remaining(0, None, None, None, None, None), 3) == []


def test_the_split_is_of_what_the_ledgers_above_leave():
    parent = Ledger(Budget(output_tokens=90))
    child = parent.child(Budget(generations=5))
    left = chain_left(child)
    assert (left.generations, left.output_tokens) == (5, 90)
    assert [(p.generations, p.output_tokens) for p in split_budget(left, 2)] == [(3, 45), (2, 45)]


def test_each_approach_spends_within_its_part_of_a_token_budget():
    lm = scripted(answers={"Multiply directly.": ["The answer is 42. " + "padding " * 100]}, price=Price(1.0, 2.0))
    budget = Budget(generations=7, output_tokens=400, usd=0.01)
    result = run(Planning(SelfConsistency(SelfConsistencyOptions(SamplingOptions(min_tokens=1)))), lm, budget)
    assert not result.spent.violations(budget)
    plan_out = next(r for r in result.trace if r.kind == "planning").usage.output_tokens
    # the talkative approach was held to its third of what the plan left, and cut there
    first = split_budget(Remaining(6, None, 400 - plan_out, None, None, None), 3)[0].output_tokens
    talk = [c for c in result.candidates if "padding" in c.text]
    assert talk and sum(c.output_tokens for c in talk) <= first < 2 * 104
    assert any(c.finish_reason == "length" for c in talk)
    assert result.spent.generations <= 7


def test_interim_results_come_as_approaches_finish():
    async def collect():
        stream = Planning(SelfConsistency()).stream(scripted(), QUESTION, Budget(generations=7), seed=1)
        return [r async for r in stream]

    # self-consistency yields an interim result per batch and a final one: 2 per approach, pooled
    results = asyncio.run(collect())
    assert [r.final for r in results] == [False] * 6 + [True]
    sizes = [len(r.candidates) for r in results]
    assert sizes == sorted(sizes) and sizes[0] in (1, 2) and sizes[-1] == 6


# -- reading plans ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("1. Algebra\n2. Guess and check\n3. Draw a diagram", ["Algebra", "Guess and check", "Draw a diagram"]),
    ("Approaches:\n1) Algebra\n(2) Guess\nApproach 3: Diagram", ["Algebra", "Guess", "Diagram"]),
    ("**1.** **Algebra**: set up an equation\n**2. Guess** - try values", ["Algebra: set up an equation",
                                                                          "Guess - try values"]),
    ("1. Algebra: write\n   the equation and solve it\n2. Guess\n\nThese work.",
     ["Algebra: write the equation and solve it", "Guess"]),
    ("1. Algebra\n2. algebra!\n3. Guess", ["Algebra", "Guess"]),
    ("- Algebra\n* Guess\n  - with care", ["Algebra", "Guess with care"]),
    ("1. Algebra\n- not an approach\n2. Guess", ["Algebra", "Guess"]),
    ("2.5 apples cost 1.25 dollars.\nJust multiply.", []),
    ("Step 1: multiply\nStep 2: check", []),
    ("1.\n2. 42", []),
    ("", []),
])
def test_plans_are_read_from_numbered_lists(text, expected):
    assert parse_plan(text) == expected


def test_a_plan_is_cut_to_the_approaches_asked_for():
    assert parse_plan("1. A way\n2. B way\n3. C way", 2) == ["A way", "B way"]


def test_the_approach_goes_at_the_end_of_the_user_message():
    assert with_instruction("What is 2+2?", "Use this approach: count.") == "What is 2+2?\n\nUse this approach: count."
    chat = with_instruction(Prompt.chat("What is 2+2?", system="Be brief."), "Use this approach: count.")
    assert isinstance(chat, Prompt) and chat.messages[0].content == "Be brief."
    assert chat.messages[1].content == "What is 2+2?\n\nUse this approach: count."
    raw = with_instruction(Prompt.raw("Q: 2+2?"), "Use this approach: count.")
    assert isinstance(raw, Prompt) and raw.text == "Q: 2+2?\n\nUse this approach: count.\n"


def test_options_are_checked():
    for bad, match in (({"approaches": 0}, "approaches"), ({"plan_tokens": 0}, "plan_tokens"),
                       ({"plan_temperature": 3.0}, "plan_temperature"), ({"plan_prompt": "List ways."}, "question"),
                       ({"plan_prompt": "{question} {other}"}, "may hold only"),
                       ({"instruction": "Go."}, "approach")):
        with pytest.raises(ConfigError, match=match):
            PlanningOptions(**bad)
    with pytest.raises(ConfigError, match="another planning"):
        Planning(Planning(SelfConsistency()))


# -- other bases ----------------------------------------------------------------------------------------


def test_a_search_base_spends_each_part_and_the_best_score_over_all_approaches_wins():
    plan_or_tree = tree_backend()

    def reply(prompt, params, call, i):
        return "1. Multiply.\n2. Write it out." if is_plan(prompt) else plan_or_tree._reply(prompt, params, call, i)

    lm = ScriptedBackend(reply)
    result = run(Planning(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=TableScorer())), lm,
                 Budget(generations=9))
    steps = [c for c in lm.calls if not is_plan(c.prompt)]
    assert {user_of(c.prompt).rsplit(": ", 1)[1] for c in steps} == {"Multiply.", "Write it out."}
    assert result.spent.generations == 9 == 1 + len(result.candidates)  # beams of 4 and 4
    assert result.answer == "42"
    assert result.candidates[[c.score for c in result.candidates].index(0.99)].answer == "42"


def test_pooled_choice_follows_the_base_rule():
    eq = Equivalence()

    def cand(answer, score=None):
        return Candidate(f"The answer is {answer}.", answer, answer, "answer_is", "stop", 5, None, score=score)

    scored = [cand("1", 0.9), cand("2", 0.5), cand("2", 0.6)]
    assert pooled_choice(BestOfN(), scored, eq)[0] == "1"  # the best score
    assert pooled_choice(BestOfN(BestOfNOptions(weighted=True)), scored, eq)[0] == "2"  # summed: 1.1 > 0.9
    plain = [cand("1"), cand("2"), cand("2")]
    answer, index, distribution, voted = pooled_choice(SelfConsistency(), plain, eq)
    assert (answer, index, distribution) == ("2", 1, {"2": 2.0, "1": 1.0}) and [c.votes for c in voted] == [1, 2, 2]
    assert pooled_choice(SelfConsistency(), [], eq)[0] is None


def test_pooled_choice_of_a_particle_filter_is_its_weighted_vote_or_its_best_weight():
    # three particles answer 5 (score 0.6, odds 1.5 each), one answers 9 (0.7, odds 7/3)
    def cand(answer, score):
        return Candidate(f"The answer is {answer}.", answer, answer, "answer_is", "stop", 5, None, score=score,
                         steps=(f"The answer is {answer}.",), step_scores=(score,))

    pooled = [cand("5", 0.6), cand("5", 0.6), cand("5", 0.6), cand("9", 0.7)]
    vote = ParticleFiltering(ParticleFilteringOptions(answer="weighted-vote"))
    answer, index, distribution, voted = pooled_choice(vote, pooled, Equivalence())
    assert (answer, index) == ("5", 0)
    assert distribution == pytest.approx({"5": 4.5 / (4.5 + 7 / 3), "9": (7 / 3) / (4.5 + 7 / 3)})
    assert [c.score for c in voted] == [0.6, 0.6, 0.6, 0.7] and [c.votes for c in voted] == [3, 3, 3, 1]
    assert pooled_choice(ParticleFiltering(), pooled, Equivalence())[:2] == ("9", 3)  # "best": the highest weight


@pytest.mark.parametrize("how", ["cancelled", "a bug"])
def test_a_plan_cut_short_gives_its_held_generation_back(how):
    def reply(prompt, params, call, i):
        if how == "a bug":
            raise RuntimeError("a bug in the backend")
        return PLAN

    async def go():
        ledger = Ledger(Budget(generations=8))
        lm = ScriptedBackend(reply, latency_s=5.0 if how == "cancelled" else 0.0)
        task = asyncio.ensure_future(Planning(SelfConsistency()).run(lm, QUESTION, ledger, seed=1))
        while not lm.calls and not task.done():
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises((asyncio.CancelledError, RuntimeError)):
            await task
        return ledger, lm

    ledger, lm = asyncio.run(go())
    assert len(lm.calls) == 1 and is_plan(lm.calls[0].prompt)
    assert ledger.remaining().generations == 8 and ledger.spend().generations == 0


def test_closing_the_stream_early_stops_every_approach_at_once():
    tree = tree_backend()

    def reply(prompt, params, call, i):
        return "1. Multiply.\n2. Write it out." if is_plan(prompt) else tree._reply(prompt, params, call, i)

    async def go():
        ledger = Ledger(Budget(generations=9))
        lm = ScriptedBackend(reply, latency_s=0.02)
        stream = Planning(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=TableScorer())).stream(
            lm, QUESTION, ledger, seed=1)
        first = await anext(stream)
        await stream.aclose()
        made = len(lm.calls)
        await asyncio.sleep(0.3)  # several search steps' time
        return first, made, lm, ledger

    first, made, lm, ledger = asyncio.run(go())
    assert not first.final
    assert len(lm.calls) == made  # no approach asks for anything once the stream is closed
    assert ledger.remaining().generations == 9 - ledger.spend().generations  # no hold left behind


# -- the budget -------------------------------------------------------------------------------------------

PLANS = [PLAN, "1. One way.\n2. One way.", "No list here.", "1) Only one.", "1. A.\n2. B.\n3. C.\n4. D.\n5. E."]


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=budgets(),
    base=st.sampled_from(["sc", "beam"]),
    plan=st.sampled_from(PLANS),
    approaches=st.integers(1, 4),
    salt=st.integers(0, 10_000),
    native_n=st.booleans(),
    max_tokens=st.integers(2, 30),
)
def test_no_limit_is_ever_exceeded(budget, base, plan, approaches, salt, native_n, max_tokens):
    price = Price(1.0, 2.0)
    steps = random_tree(salt)

    def reply(prompt, params, call, i):
        return plan if is_plan(prompt) else steps(prompt, params, call, i)

    lm = ScriptedBackend(reply, native_n=native_n, price=price)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=1)
    if base == "sc":
        algorithm = SelfConsistency(SelfConsistencyOptions(sampling))
    else:
        scorer = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS})
        algorithm = BeamSearch(BeamSearchOptions(sampling, StepOptions(max_steps=3, max_step_tokens=6), beam_width=2,
                                                 width=4), process_scorer=scorer)
    ledger = Ledger(budget)
    result = asyncio.run(Planning(algorithm, PlanningOptions(approaches=approaches, plan_tokens=16))
                         .run(lm, QUESTION, ledger, seed=3))
    spent = result.spent

    assert not spent.violations(budget)
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)
    assert spent.planning_generations <= 1
    assert spent.generations == len(result.candidates) + spent.planning_generations
    gen = budget.generations
    if gen is not None:
        assert ledger.remaining().generations == gen - spent.generations  # no hold left behind
        if set(budget.limits()) == {"generations"} and base == "sc":
            assert spent.generations == gen  # the plan and every approach's part, exactly
