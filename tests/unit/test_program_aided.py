"""Program-aided answers on the scripted backend: programs run in the sandbox, their printed answers
vote, and tool calls are charged one per run, never past the budget."""

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion import Budget, Ledger, ProgramAided, ProgramAidedOptions, SamplingOptions, make_algorithm
from apportion.algorithms.program_aided import PROGRAM_SYSTEM_PROMPT, extract_program, program_answer
from apportion.algorithms.stopping import parse_stop
from apportion.budget.units import to_fraction
from apportion.errors import BudgetError
from apportion.lm.scripted import ScriptedBackend
from tests.conftest import examples

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"


def fenced(code: str) -> str:
    return f"Here is the program:\n```python\n{code}\n```\nIt prints the answer."


FORTY_TWO = fenced("sheep = 17\nbought = 25\nprint(sheep + bought)")
WRONG = fenced("print(25 - 17)")
NO_CODE = "There are 42 sheep."


def pal(**options):
    return ProgramAided(ProgramAidedOptions(**options))


async def test_programs_that_print_answers_give_a_majority():
    lm = ScriptedBackend([FORTY_TWO, fenced("print(40 + 2)"), WRONG, NO_CODE])
    result = await pal().run(lm, QUESTION, Budget(generations=4))
    assert result.answer == "42" and result.distribution == {"42": 2, "8": 1}
    assert [c.answer for c in result.candidates] == ["42", "42", "8", None]  # the prose's 42 is no program's
    assert [c.extraction for c in result.candidates] == ["program", "program", "program", None]
    assert result.response == FORTY_TWO
    assert (result.spent.generations, result.spent.tool_calls) == (4, 3)  # no code: not run, not charged
    assert len(lm.calls) == 1 and lm.calls[0].params.n == 4  # one batched request
    assert lm.calls[0].prompt.messages[0].content == PROGRAM_SYSTEM_PROMPT
    assert [r.kind for r in result.trace] == ["policy", "tool", "tool", "tool"]
    assert any("1 without runnable code" in n for n in result.notes)


async def test_a_tool_call_limit_sizes_the_batch_and_stops_runs_exactly():
    lm = ScriptedBackend([FORTY_TWO])
    result = await pal().run(lm, QUESTION, Budget.parse("gen=8,tool_calls=4"))
    assert [c.params.n for c in lm.calls] == [4]  # a program that could not be run would be a wasted generation
    assert (result.spent.generations, result.spent.tool_calls) == (4, 4)
    assert result.exhausted and result.exhausted_reason == "tool_calls: none left"
    assert result.to_dict()["spent"]["tool_calls"] == 4 and result.to_dict()["budget"]["tool_calls"] == 4


async def test_replies_without_code_are_redrawn_while_generations_last():
    lm = ScriptedBackend([FORTY_TWO, NO_CODE])
    result = await pal().run(lm, QUESTION, Budget.parse("gen=8,tool_calls=4"))
    assert [c.params.n for c in lm.calls] == [4, 2, 1]
    assert (result.spent.generations, result.spent.tool_calls) == (7, 4)


async def test_a_budget_of_tool_calls_alone_draws_one_program_per_tool_call():
    lm = ScriptedBackend([NO_CODE])  # never a program: redrawing would never end
    result = await pal().run(lm, QUESTION, Budget(tool_calls=3))
    assert (result.spent.generations, result.spent.tool_calls) == (3, 0)
    assert result.answer is None
    lm = ScriptedBackend([FORTY_TWO])
    result = await pal().run(lm, QUESTION, Budget(tool_calls=3))
    assert (result.spent.generations, result.spent.tool_calls, result.answer) == (3, 3, "42")


async def test_algorithms_without_tools_refuse_a_budget_of_tool_calls_alone():
    with pytest.raises(BudgetError, match="tool calls alone"):
        await make_algorithm("self-consistency").run(ScriptedBackend([FORTY_TWO]), QUESTION, Budget(tool_calls=3))
    result = await make_algorithm("sc").run(ScriptedBackend(["The answer is 4"]), QUESTION,
                                            Budget(generations=2, tool_calls=3))
    assert result.spent.tool_calls == 0 and result.answer == "4"


async def test_sandbox_faults_give_no_answer_but_are_charged():
    faults = [fenced("while True:\n    pass"), fenced("print('partial')\nraise RuntimeError('boom')"),
              fenced("x = bytearray(4 * 1024 ** 3)"), fenced("x = 1"), fenced("while True:\n    print('y' * 999)")]
    lm = ScriptedBackend([*faults, FORTY_TWO])
    result = await pal(time_limit_s=0.5, memory_mb=128, output_bytes=5000).run(lm, QUESTION, Budget(generations=6))
    assert result.answer == "42" and result.distribution == {"42": 1}
    assert [c.answer for c in result.candidates] == [None] * 5 + ["42"]
    assert result.spent.tool_calls == 6
    errors = [r.error for r in result.trace if r.kind == "tool"]
    assert sorted(errors, key=str) == sorted(["timed out", "exit 1: RuntimeError: boom", "passed its memory limit",
                                              None, "wrote too much output", None], key=str)
    note = next(n for n in result.notes if n.startswith("programs:"))
    for part in ("6 drawn, 6 run", "1 printed an answer", "1 timed out", "1 exited with an error",
                 "1 passed its memory limit", "1 printed nothing", "1 wrote too much output"):
        assert part in note


async def test_programs_not_run_for_want_of_tool_calls_are_noted():
    parent = Ledger(Budget(tool_calls=2))  # the parent's limit binds, not the run's own
    lm = ScriptedBackend([FORTY_TWO])
    result = await pal(concurrency=1).run(lm, QUESTION, parent.child(Budget(generations=4)))
    assert (result.spent.generations, result.spent.tool_calls) == (4, 2)
    assert [c.answer for c in result.candidates] == ["42", "42", None, None]
    note = next(n for n in result.notes if n.startswith("programs:"))
    assert "2 not run (parent budget: tool_calls: none left)" in note
    assert result.exhausted


async def test_a_stopping_rule_sees_the_programs_answers():
    lm = ScriptedBackend([FORTY_TWO])
    result = await pal(stopping=parse_stop("esc:window=2")).run(lm, QUESTION, Budget(generations=8))
    assert result.stop_reason == "esc" and result.answer == "42"
    assert (result.spent.generations, result.spent.tool_calls) == (2, 2)


def test_the_registry_and_its_aliases():
    for name in ("program-aided", "pal", "PAL"):
        alg = make_algorithm(name, SamplingOptions())
        assert isinstance(alg, ProgramAided)
        assert alg.options.sampling.system_prompt == PROGRAM_SYSTEM_PROMPT  # the shared default is replaced
    mine = make_algorithm("pal", SamplingOptions(system_prompt="Write code."))
    assert mine.options.sampling.system_prompt == "Write code."
    limited = make_algorithm("pal", programs=ProgramAidedOptions(time_limit_s=2, memory_mb=256))
    assert (limited.options.time_limit_s, limited.options.memory_mb) == (2, 256)


@pytest.mark.parametrize("text, code", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("```py\nprint(1)\n```\nOutput:\n```\n1\n```", "print(1)\n"),
    ("```\nx = 2\nprint(x)\n```", "x = 2\nprint(x)\n"),
    ("First:\n```python\nprint(1)\n```\nFixed:\n```python\nprint(2)\n```", "print(2)\n"),
    ("```python\nprint(3)\n", "print(3)\n"),  # cut before its closing fence
    ("print(4)", "print(4)"),  # the whole reply
    ("The answer is 4.", None),  # prose does not compile
    ("```output\n4\n```", None),
    ("```python\n\n```", None),
])
def test_extract_program(text, code):
    assert extract_program(text) == code


@pytest.mark.parametrize("stdout, answer", [
    ("42\n", "42"), ("working\n42.0\n\n", "42"), ("42 sheep\n", "42"), ("x = 5\n", "5"),
    ("The answer is 7\n", "7"), ("Answer: 3/4\n", "0.75"), ("[1, 2]\n", "[1, 2]"), ("", None), ("\n \n", None),
    ("The result is: 19\n", "19"), ("Total sheep = 42 sheep\n", "42"), ("x is even\n", "x is even"),
    ("ratio: a/b\n", "ratio: a/b"), ("The answer is: 42\n", "42"),
])
def test_program_answer_is_the_last_line_normalised(stdout, answer):
    assert program_answer(stdout)[0] == answer


PROGRAMS = [FORTY_TWO, WRONG, NO_CODE, fenced("1 / 0"), fenced("pass"), fenced("print(6 * 7)"), "print(41 + 1)"]


@st.composite
def budgets(draw):
    limits = {"generations": st.integers(1, 10), "tool_calls": st.integers(1, 6),
              "total_tokens": st.integers(20, 400), "usd": st.sampled_from([0.0005, 0.002])}
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=4, unique=True))
    if chosen == ["usd"]:
        chosen.append("tool_calls")
    return Budget(**{name: draw(limits[name]) for name in chosen})


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=budgets(), replies=st.lists(st.sampled_from(PROGRAMS), min_size=1, max_size=5),
       native_n=st.booleans(), batch_size=st.one_of(st.none(), st.integers(1, 4)))
def test_never_more_tool_calls_or_generations_than_budgeted(budget, replies, native_n, batch_size):
    from apportion import Price

    lm = ScriptedBackend(replies, native_n=native_n, price=Price(10.0, 30.0))
    alg = pal(sampling=SamplingOptions(max_tokens=30, min_tokens=5, batch_size=batch_size,
                                       system_prompt=PROGRAM_SYSTEM_PROMPT))
    result = asyncio.run(alg.run(lm, QUESTION, budget, seed=1))
    spent = result.spent
    assert not spent.violations(budget)
    if budget.tool_calls is not None:
        assert spent.tool_calls <= budget.tool_calls
    if budget.generations is not None:
        assert spent.generations <= budget.generations
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)
    runs = [r for r in result.trace if r.kind == "tool"]
    assert spent.tool_calls == len(runs)
    assert len(result.candidates) == spent.generations
    runnable = sum(extract_program(c.text) is not None for c in result.candidates)
    assert spent.tool_calls == runnable  # every program drawn with code was run: none drawn in vain
    if result.exhausted_reason == "tool_calls: none left":
        assert spent.tool_calls == budget.tool_calls  # a tool-call limit stops runs exactly
    assert all(c.answer is None or c.extraction == "program" for c in result.candidates)
    json.dumps(result.to_dict())


def test_run_from_the_command_line_shows_tool_calls():
    from typer.testing import CliRunner

    from apportion.cli import app
    from tests.support.fake_openai import FakeOpenAI

    with FakeOpenAI(lambda body, i: "print(17 + 25)") as server:  # the fake joins words: a one-line program
        result = CliRunner().invoke(app, [
            "run", QUESTION, "--algorithm", "program-aided", "--budget", "gen=8,tool_calls=4",
            "--base-url", server.base_url, "--model", server.model, "--json"])
        bodies = server.billing.bodies
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "42" and out["algorithm"] == "program-aided"
    assert (out["spent"]["generations"], out["spent"]["tool_calls"]) == (4, 4)
    assert out["budget"]["tool_calls"] == 4 and out["exhausted_reason"] == "tool_calls: none left"
    assert bodies[-1]["n"] == 4 and "Python program" in bodies[-1]["messages"][0]["content"]
    refused = CliRunner().invoke(app, ["run", QUESTION, "--budget", "tool_calls=3",
                                       "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert refused.exit_code != 0 and "tool calls alone" in refused.output
