"""Budget forcing on the scripted backend (a token is a word), and the ledger's continuation kind."""

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion import Budget, BudgetForcing, BudgetForcingOptions, Ledger, SamplingOptions
from apportion.algorithms.budget_forcing import thinking_room
from apportion.algorithms.registry import make_algorithm
from apportion.budget.ledger import Ask, Remaining
from apportion.budget.units import Price, Usage
from apportion.errors import BudgetError, ConfigError
from apportion.lm.base import Capabilities, SamplingParams
from apportion.lm.http_reply import read_reply
from apportion.lm.scripted import Reply, ScriptedBackend
from tests.conftest import examples

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"
NO_SYSTEM = SamplingOptions(system_prompt=None, max_tokens=64, min_tokens=1)


def forcing(**kwargs) -> BudgetForcing:
    return BudgetForcing(BudgetForcingOptions(sampling=kwargs.pop("sampling", NO_SYSTEM), **kwargs))


def by_call(*replies):
    """Reply ``replies[k]`` to the k-th call (the last one thereafter)."""
    def reply(prompt, params, call, i):
        return replies[min(call, len(replies) - 1)]
    return reply


def test_the_ledger_charges_continuations_in_tokens_but_not_as_generations():
    ledger = Ledger(Budget(generations=1, output_tokens=100))
    first = ledger.reserve(Ask(n=1, max_tokens=30, prompt_tokens=5))
    ledger.settle(first, Usage(1, 5, 30))
    assert ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=5)) is None  # no generation left
    more = ledger.reserve(Ask(n=1, max_tokens=90, prompt_tokens=5, kind="continuation"))
    assert more is not None and more.max_tokens == 70  # but tokens still bind it
    ledger.settle(more, Usage(1, 5, 70))
    spend = ledger.spend()
    assert (spend.generations, spend.continuations, spend.output_tokens) == (1, 1, 100)
    assert spend.violations(Budget(generations=1, output_tokens=100)) == []
    assert ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=5, kind="continuation")) is None
    with pytest.raises(BudgetError, match="kind"):
        Ask(n=1, max_tokens=1, prompt_tokens=0, kind="bonus")


async def test_under_the_minimum_the_end_is_suppressed_and_wait_appended_under_gen_1():
    lm = ScriptedBackend(by_call("Add 17 and 25. The answer is 42",
                                 "17 plus 25 makes 42 sheep in all. The answer is 42",
                                 " 42."))
    result = await forcing(min_thinking_tokens=10).run(lm, QUESTION, Budget(generations=1))
    assert result.answer == "42"
    first, wait, answer = lm.calls
    assert first.prompt.assistant_prefix == "" and first.params.stop == ("The answer is",)
    assert wait.prompt.assistant_prefix == "Add 17 and 25. Wait,"
    assert answer.prompt.assistant_prefix == "Add 17 and 25. Wait,17 plus 25 makes 42 sheep in all. The answer is"
    assert [r.kind for r in result.trace] == ["policy", "continuation", "continuation"]
    s = result.spent
    assert (s.generations, s.continuations, s.output_tokens) == (1, 2, 4 + 8 + 1)
    assert result.candidates[0].output_tokens == 13
    assert result.candidates[0].text.endswith("The answer is 42.")
    assert any("12 thinking tokens (min 10" in n and "1 wait(s)" in n for n in result.notes)


async def test_at_the_maximum_thinking_is_cut_and_the_model_made_to_answer():
    lm = ScriptedBackend(by_call("one two three four five six seven eight nine ten", "42"))
    result = await forcing(max_thinking_tokens=5).run(lm, QUESTION, Budget(generations=1))
    thinking, answer = lm.calls
    assert thinking.params.max_tokens == 5
    assert answer.prompt.assistant_prefix == "one two three four five The answer is"
    assert result.answer == "42" and result.spent.generations == 1 and result.spent.continuations == 1
    assert any("cut at the maximum" in n for n in result.notes)


async def test_a_thinking_marker_and_an_answer_cue_for_reasoning_models():
    lm = ScriptedBackend(by_call("<think>17 + 25 = 42</think>The answer is 42", " \\boxed{42}"))
    options = BudgetForcingOptions.reasoning_model(sampling=NO_SYSTEM, min_thinking_tokens=2)
    result = await BudgetForcing(options).run(lm, QUESTION, Budget(generations=1))
    assert lm.calls[0].params.stop == ("</think>",)
    assert lm.calls[1].prompt.assistant_prefix == "<think>17 + 25 = 42 </think>\n\nThe answer is"
    assert result.answer == "42"


async def test_reasoning_content_is_read_counted_and_forced_on():
    # a reasoning server: thinking in reasoning_content, the answer in content
    lm = ScriptedBackend(by_call(Reply("The answer is 41", reasoning="I add them"),
                                 Reply("", reasoning="17 and 25 is 42, so four two"),
                                 Reply(" 42")))
    options = BudgetForcingOptions.reasoning_model(sampling=NO_SYSTEM, min_thinking_tokens=8)
    result = await BudgetForcing(options).run(lm, QUESTION, Budget(generations=1))
    _, wait, answer = lm.calls
    assert wait.prompt.assistant_prefix == "I add them\nWait,"  # the server's answer under the minimum is dropped
    assert answer.prompt.assistant_prefix.startswith("I add them\nWait,17 and 25 is 42")
    assert answer.prompt.assistant_prefix.endswith("</think>\n\nThe answer is")
    assert result.answer == "42" and result.spent.generations == 1


async def test_a_server_answer_after_enough_reasoning_is_taken_as_is():
    lm = ScriptedBackend(by_call(Reply("The answer is 42", reasoning="one two three four five six")))
    options = BudgetForcingOptions.reasoning_model(sampling=NO_SYSTEM, min_thinking_tokens=3)
    result = await BudgetForcing(options).run(lm, QUESTION, Budget(generations=1))
    assert len(lm.calls) == 1 and result.answer == "42"
    assert any("7 thinking tokens" in n for n in result.notes)  # 10 tokens shared by bytes: 27 of 43


async def test_a_minimum_the_budget_cannot_pay_for_still_leaves_room_for_the_answer():
    lm = ScriptedBackend(by_call("short. The answer is 42", "more words here and here. The answer is", " 42"))
    budget = Budget(generations=1, output_tokens=12)
    result = await forcing(min_thinking_tokens=50, answer_tokens=4).run(lm, QUESTION, budget)
    assert result.spent.output_tokens <= 12 and result.answer == "42"
    assert lm.calls[-1].prompt.assistant_prefix.endswith("The answer is")


async def test_several_solutions_are_voted_and_each_is_one_generation():
    lm = ScriptedBackend(lambda p, params, call, i: "x The answer is" if call == 0 else (" 42" if call % 2 else " 7"))
    result = await forcing().run(lm, QUESTION, Budget(generations=3))
    assert result.spent.generations == 3 and result.spent.continuations == 3
    assert len(result.candidates) == 3 and lm.calls[0].params.n == 3


async def test_budget_forcing_needs_continuation_and_takes_no_stop_rule():
    @dataclass
    class NoContinuation(ScriptedBackend):
        @property
        def capabilities(self) -> Capabilities:
            return Capabilities(native_n=True, continuation=False)

    with pytest.raises(ConfigError, match="continues"):
        await forcing().run(NoContinuation(["x"]), QUESTION, Budget(generations=1))
    from apportion.algorithms.stopping import parse_stop
    with pytest.raises(ConfigError, match="stopping rule"):
        make_algorithm("budget-forcing", stopping=parse_stop("esc"))
    with pytest.raises(ConfigError, match="not self-consistency"):
        make_algorithm("sc", forcing=BudgetForcingOptions())
    with pytest.raises(ConfigError, match="above the maximum"):
        BudgetForcingOptions(min_thinking_tokens=10, max_thinking_tokens=5)
    alg = make_algorithm("s1", NO_SYSTEM, forcing=BudgetForcingOptions(min_thinking_tokens=3))
    assert isinstance(alg, BudgetForcing) and alg.options.min_thinking_tokens == 3
    assert alg.options.sampling is NO_SYSTEM


def test_thinking_room_leaves_the_answer_call_its_share():
    def rem(**kw):
        return Remaining(**{k: kw.get(k) for k in Remaining.__slots__})

    assert thinking_room(rem(), 10, 3, 8, Price()) is None
    assert thinking_room(rem(output_tokens=100), 10, 3, 8, Price()) == 92
    assert thinking_room(rem(output_tokens=100), 10, 3, 8, Price(), share=2) == 42
    assert thinking_room(rem(input_tokens=100), 10, 3, 8, Price()) == 77
    # this call: 10 in + t out; the answer: 10 + t + 3 in, 8 out
    assert thinking_room(rem(total_tokens=100), 10, 3, 8, Price()) == 34
    from fractions import Fraction
    assert thinking_room(rem(usd=Fraction(100, 10**6)), 10, 3, 8, Price(1, 1)) == 34


def test_reasoning_content_is_kept_on_the_sample():
    data = {"choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"content": "42", "reasoning_content": "17 + 25"}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9}}
    sample = read_reply(data, SamplingParams(), 5).samples[0]
    assert (sample.text, sample.reasoning, sample.output_tokens) == ("42", "17 + 25", 9)


words = st.lists(st.sampled_from(["add", "17", "25", "so", "42.", "The answer is", "</think>"]), max_size=30)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(words.map(" ".join), min_size=1, max_size=6),
       min_think=st.integers(0, 40), max_think=st.integers(1, 40), answer_tokens=st.integers(1, 10),
       samples=st.integers(1, 3), gen=st.one_of(st.none(), st.integers(1, 3)),
       out=st.one_of(st.none(), st.integers(1, 120)), total=st.one_of(st.none(), st.integers(1, 400)),
       usd=st.one_of(st.none(), st.integers(1, 400)), reasoning=st.booleans())
async def test_no_budget_is_ever_exceeded_and_a_solution_is_one_generation(
        replies, min_think, max_think, answer_tokens, samples, gen, out, total, usd, reasoning):
    min_think = min(min_think, max_think)
    if gen is None and out is None and total is None and usd is None:
        gen = 1
    budget = Budget(generations=gen, output_tokens=out, total_tokens=total,
                    usd=None if usd is None else usd / 10**6)
    scripted = [Reply(r, reasoning=r[: len(r) // 2]) if reasoning else r for r in replies]
    lm = ScriptedBackend(scripted, price=Price(1, 1))
    options = BudgetForcingOptions(sampling=NO_SYSTEM, min_thinking_tokens=min_think, max_thinking_tokens=max_think,
                                   answer_tokens=answer_tokens, samples=samples, max_waits=4)
    result = await BudgetForcing(options).run(lm, QUESTION, budget, seed=1)
    spent = result.spent
    assert spent.violations(budget) == []
    assert spent.generations == len(result.candidates) <= (gen or samples)
    assert spent.continuations == len(lm.calls) - (1 if lm.calls else 0)
    for call in lm.calls:
        assert call.params.max_tokens <= max(max_think, answer_tokens)
    if not reasoning:
        for c in result.candidates:
            assert c.output_tokens <= max_think + answer_tokens


def test_the_command_line_forces_over_http_by_continuing_the_assistant_message():
    import json

    from typer.testing import CliRunner

    from apportion.cli import app
    from tests.support.fake_openai import FakeOpenAI

    def reply(body, index):
        messages = body.get("messages", [])
        if messages and messages[-1]["role"] == "assistant":
            return "42."
        return "one two three four five six seven eight nine ten"

    with FakeOpenAI(reply) as server:
        result = CliRunner().invoke(app, [
            "run", QUESTION, "--algorithm", "budget-forcing", "--budget", "gen=1,tokens=2000",
            "--max-thinking-tokens", "5", "--base-url", server.base_url, "--model", server.model, "--json"])
        bodies = server.billing.bodies
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "42" and out["algorithm"] == "budget-forcing"
    assert (out["spent"]["generations"], out["spent"]["continuations"]) == (1, 1)
    assert out["spent"]["total_tokens"] <= 2000
    first, answer = bodies
    assert first["max_tokens"] == 5 and first["stop"] == ["The answer is"]
    assert answer["continue_final_message"] is True
    assert answer["messages"][-1] == {"role": "assistant", "content": "one two three four five The answer is"}


async def test_a_failed_continuation_keeps_the_solution_drawn_and_says_so():
    from apportion.errors import BackendError

    lm = ScriptedBackend(by_call("17 and 25 make 42. The answer is 42",
                                 Reply("", error=BackendError("server gone", billed=False, retryable=False))))
    result = await forcing(min_thinking_tokens=20).run(lm, QUESTION, Budget(generations=1))
    assert result.partial and "server gone" in result.error
    assert result.answer == "42" and result.candidates[0].text == "17 and 25 make 42. "  # no dangling "Wait"
    assert any("ended by a failure" in n for n in result.notes)


async def test_a_copied_placeholder_is_no_answer_here_too():
    """Budget forcing reads its answers as every run does: "N" from "The answer is N" is none."""
    lm = ScriptedBackend(by_call("Add 17 and 25. The answer is", " N."))
    sampling = SamplingOptions(system_prompt="End with 'The answer is N'.", max_tokens=64, min_tokens=1)
    result = await forcing(sampling=sampling).run(lm, QUESTION, Budget(generations=1))
    assert result.answer is None and result.candidates[0].answer is None
