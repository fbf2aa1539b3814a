"""The LLM step judge (through the scripted backend, with and without log-probabilities) and the
programmatic verifiers, Game of 24 rows from the shared data included."""

import asyncio
import csv
import itertools
import math
import time
from fractions import Fraction

import pytest

from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import BackendError, BudgetExhausted, ConfigError, ProcessScoringFailed
from apportion.lm.base import Sample
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import Reply, ScriptedBackend
from apportion.reward import (
    CallableVerifier,
    JudgeProcessScorer,
    ProcessJudgeOptions,
    ProcessScorer,
    check_game24,
    game24_numbers,
    game24_verifier,
    read_verdict,
)
from apportion.reward.verifiers import evaluate_arithmetic
from tests.conftest import DATA

QUESTION = "What is 2 + 3 * 4?"


def metered(budget: Budget | None = None, backend: ScriptedBackend | None = None) -> MeteredLM:
    return MeteredLM(backend or ScriptedBackend(["unused"]), Ledger(budget or Budget(total_tokens=100_000)))


def judged_step(prompt) -> str:
    """The new step a judge prompt asks about."""
    return prompt.messages[-1].content.split("New step:\n")[1].split("\n")[0]


# -- the LLM step judge ----------------------------------------------------------------------------


def verdicts(p_yes: dict[str, float]):
    """A judge that says Yes (or No) about each step with the probability given for its text."""

    def reply(prompt, params, call, i):
        step = judged_step(prompt).split(": ", 1)[1]
        p = p_yes[step]
        return Reply("Yes" if p >= 0.5 else "No", logprob=math.log(max(p, 1 - p)))

    return reply


async def test_judge_reads_the_probability_of_yes_from_logprobs():
    judge_backend = ScriptedBackend(verdicts({"a": 0.8, "b": 0.3, "c": 0.6}))
    judge = JudgeProcessScorer(judge_backend)
    assert isinstance(judge, ProcessScorer)
    scores = await judge.score(metered(), QUESTION, [["a", "b"], ["a", "c"]])
    assert scores == [[pytest.approx(0.8), pytest.approx(0.3)], [pytest.approx(0.8), pytest.approx(0.6)]]
    assert len(judge_backend.calls) == 3  # the shared first step judged once
    params = judge_backend.calls[0].params
    assert params.logprobs and params.max_tokens == 8 and params.temperature == 0.0


async def test_judge_prompt_holds_the_question_the_previous_steps_and_the_new_one():
    judge_backend = ScriptedBackend(verdicts({"x = 12": 0.9, "x + 2 = 14": 0.9}))
    await JudgeProcessScorer(judge_backend).score(metered(), QUESTION, [["x = 12", "x + 2 = 14"]])
    contents = sorted((c.prompt.messages[-1].content for c in judge_backend.calls), key=lambda c: "Step 2" in c)
    assert "Problem:\nWhat is 2 + 3 * 4?" in contents[0]
    assert "Steps so far:\n(none: this is the first step)" in contents[0]
    assert "New step:\nStep 1: x = 12" in contents[0]
    assert "Steps so far:\nStep 1: x = 12\n\nNew step:\nStep 2: x + 2 = 14" in contents[1]
    assert "Answer with one word: Yes or No" in contents[1]


async def test_judge_parses_a_rating_where_the_backend_has_no_logprobs():
    backend = ScriptedBackend(lambda p, params, c, i: "Score: 7" if "good" in judged_step(p) else "Score: 2/10",
                              logprobs=False)
    judge = JudgeProcessScorer(backend)
    assert await judge.score(metered(), QUESTION, [["good", "bad"]]) == [[0.7, 0.2]]
    assert not backend.calls[0].params.logprobs
    assert "Reply with one line: Score: <number>" in backend.calls[0].prompt.messages[-1].content


def test_read_verdict():
    p = math.log(0.9)
    assert read_verdict(Sample("Yes", "stop", 1, (p,))) == pytest.approx(0.9)
    assert read_verdict(Sample(" No.", "stop", 2, (p, -0.1))) == pytest.approx(0.1)
    assert read_verdict(Sample("**Yes**", "stop", 3, (p,) * 3)) == 1.0  # the first token is not the verdict
    assert read_verdict(Sample("No", "stop", 1, None)) == 0.0
    assert read_verdict(Sample("Score: 8", "stop", 2, None)) == 0.8
    assert read_verdict(Sample("It depends.", "stop", 3, None)) is None


async def test_judge_samples_are_averaged():
    backend = ScriptedBackend([Reply("Yes", logprob=math.log(0.9)), Reply("No", logprob=math.log(0.9))])
    judge = JudgeProcessScorer(backend, ProcessJudgeOptions(samples=2))
    assert await judge.score(metered(), QUESTION, [["a"]]) == [[pytest.approx(0.5)]]
    assert backend.calls[0].params.n == 2


async def test_judge_calls_are_concurrent_and_charged_as_scoring():
    backend = ScriptedBackend(lambda p, params, c, i: "Yes", latency_s=0.2)
    lm = metered(Budget(generations=1, total_tokens=100_000))
    started = time.monotonic()
    scores = await JudgeProcessScorer(backend).score(lm, QUESTION, [["a", "b", "c"], ["d", "e", "f"]])
    assert time.monotonic() - started < 0.6  # six requests of 0.2 s each, together
    assert len(backend.calls) == 6 and all(len(row) == 3 for row in scores)
    spend = lm.ledger.spend()
    assert (spend.generations, spend.scorer_generations, spend.calls) == (0, 6, 6)  # answers' budget untouched
    assert spend.input_tokens == sum([await backend.prompt_tokens(c.prompt) for c in backend.calls])
    assert spend.output_tokens == 6
    assert {r.kind for r in lm.ledger.trace} == {"scorer"}


async def test_an_unreadable_verdict_is_no_score_and_is_not_asked_again():
    backend = ScriptedBackend(lambda p, params, c, i: "Hmm, hard to say")
    judge = JudgeProcessScorer(backend)
    assert await judge.score(metered(), QUESTION, [["a"]]) == [[None]]
    assert await judge.score(metered(), QUESTION, [["a"]]) == [[None]]
    assert len(backend.calls) == 1


async def test_judge_failures_keep_what_was_scored():
    def reply(prompt, params, call, i):
        return Reply("x", error=BackendError("judge down")) if "bad" in judged_step(prompt) else "Yes"

    judge = JudgeProcessScorer(ScriptedBackend(reply))
    with pytest.raises(ProcessScoringFailed, match="judge down") as info:
        await judge.score(metered(), QUESTION, [["a", "bad"], ["c"]])
    assert info.value.step_scores == [[pytest.approx(math.exp(-0.1)), None], [pytest.approx(math.exp(-0.1))]]


async def test_judge_refused_by_the_budget():
    judge = JudgeProcessScorer(ScriptedBackend(["Yes"]))
    with pytest.raises(BudgetExhausted):
        await judge.score(metered(Budget(total_tokens=10)), QUESTION, [["a step"]])


def test_judge_options_are_checked():
    with pytest.raises(ConfigError, match="mode"):
        ProcessJudgeOptions(mode="logits")
    with pytest.raises(ConfigError, match="step"):
        ProcessJudgeOptions(verdict_template="no placeholder")


# -- callables as verifiers --------------------------------------------------------------------------


async def test_a_callable_scores_every_new_prefix():
    seen = []

    def fn(question, steps):
        seen.append(tuple(steps))
        return {"ok": True, "bad": False, "half": 0.5}.get(steps[-1])

    verifier = CallableVerifier(fn)
    assert verifier.name == "fn" and isinstance(verifier, ProcessScorer)
    lm = metered()
    assert await verifier.score(lm, "q", [["ok", "half"], ["ok", "bad", "other"]]) == [[1.0, 0.5], [1.0, 0.0, None]]
    assert sorted(seen) == [("ok",), ("ok", "bad"), ("ok", "bad", "other"), ("ok", "half")]
    assert await verifier.score(lm, "q", [["ok", "half"]]) == [[1.0, 0.5]]
    assert len(seen) == 4  # cached
    spend = lm.ledger.spend()
    assert (spend.calls, spend.input_tokens, spend.scorer_generations) == (1, 0, 0)
    assert lm.ledger.trace[0].kind == "scorer" and lm.ledger.trace[0].model == "fn"


async def test_an_async_callable_is_awaited():
    async def fn(question, steps):
        await asyncio.sleep(0)
        return len(steps) / 4

    assert await CallableVerifier(fn).score(metered(), "q", [["a", "b"]]) == [[0.25, 0.5]]


async def test_outcome_only_checks_whole_paths():
    seen = []

    def fn(question, steps):
        seen.append(len(steps))
        return True

    scores = await CallableVerifier(fn, outcome_only=True).score(metered(), "q", [["a", "b", "c"]])
    assert scores == [[None, None, 1.0]] and seen == [3]


async def test_a_callable_that_hangs_raises_or_answers_nonsense_fails_its_prefix():
    def fn(question, steps):
        if steps[-1] == "hang":
            time.sleep(1.0)
        if steps[-1] == "raise":
            raise KeyError("missing")
        if steps[-1] == "big":
            return 3
        if steps[-1] == "text":
            return "yes"
        return True

    verifier = CallableVerifier(fn, timeout_s=0.1)
    for step, message in [("hang", "no verdict within 0.1 s"), ("raise", "raised KeyError"),
                          ("big", r"outside \[0, 1\]"), ("text", "returned str")]:
        with pytest.raises(ProcessScoringFailed, match=message) as info:
            await verifier.score(metered(), "q", [["fine", step]])
        assert info.value.step_scores == [[1.0, None]]


async def test_a_verifier_respects_the_deadline():
    async def slow(question, steps):
        await asyncio.sleep(5)
        return True

    lm = metered(Budget(seconds=0.2))
    with pytest.raises(BudgetExhausted, match="deadline"):
        await CallableVerifier(slow, timeout_s=10).score(lm, "q", [["a"]])


# -- Game of 24 -------------------------------------------------------------------------------------


def solve24(numbers: list[int]) -> str | None:
    """One expression of ``numbers`` that makes 24, by brute force (for the tests' puzzles)."""

    def combine(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == 24 else None
        for i, j in itertools.permutations(range(len(items)), 2):
            (a, x), (b, y) = items[i], items[j]
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            options = [(a + b, f"({x} + {y})"), (a - b, f"({x} - {y})"), (a * b, f"({x} * {y})")]
            if b != 0:
                options.append((a / b, f"({x} / {y})"))
            for option in options:
                found = combine([*rest, option])
                if found:
                    return found
        return None

    return combine([(Fraction(n), str(n)) for n in numbers])


def game24_rows(count: int) -> list[list[int]]:
    with (DATA / "game24.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [[int(x) for x in row["Puzzles"].split()] for row in rows[900:900 + count]]


def test_game24_rows_from_the_shared_data():
    for numbers in game24_rows(5):
        question = f"Use {' '.join(map(str, numbers))} and + - * / to obtain 24."
        assert game24_numbers(question) == numbers
        expression = solve24(numbers)
        assert expression is not None
        assert game24_verifier(question, ["some thinking", f"Answer: {expression} = 24"]) is True
        wrong = expression.replace("*", "+", 1) if "*" in expression else expression.replace("+", "*", 1)
        got = evaluate_arithmetic(wrong)
        if got is not None and got[0] != 24:
            assert game24_verifier(question, [f"Answer: {wrong} = 24"]) is False
        twice = " + ".join(str(n) for n in [numbers[0], *numbers])  # a number used twice
        assert game24_verifier(question, [f"{twice} = 24"]) is False
        assert game24_verifier(question, [f"{numbers[0]} + {numbers[1]} = {numbers[0] + numbers[1]}"]) is None


def test_game24_expressions():
    assert check_game24([3, 3, 8, 8], "8 / (3 - 8 / 3) = 24")  # exact fractions, not floats
    assert check_game24([3, 3, 8, 8], r"$8 \div (3 - 8 \div 3)$ = 24")
    assert check_game24([1, 1, 4, 6], "**(1 + 1) × (4 + 6) + 4 = 24**") is False  # uses 4 twice
    assert check_game24([1, 1, 4, 6], "1 × 1 × 4 × 6 = 24\nThe answer is 24.")
    assert check_game24([1, 1, 4, 6], "(1 + 1 + 4) * 6 = 36") is False
    assert check_game24([4, 6, 8, 12], "4 + 8 = 12 (left: 6 12 12)") is None
    assert game24_verifier("no numbers here", ["1 * 1 * 4 * 6"]) is None


def test_arithmetic_is_parsed_never_run():
    for text in ["__import__('os').system('true')", "2 ** 10", "abs(-24)", "1 if 1 else 2", "[24][0]", "4.5 * 2",
                 "(" * 300 + "1" + ")" * 300, "1 / 0", "x * 24", "-24"]:
        assert evaluate_arithmetic(text) is None, text
    assert evaluate_arithmetic("(2 + 4) * (8 / 2)") == (24, [2, 4, 8, 2])


async def test_game24_verifier_as_a_process_scorer():
    numbers = game24_rows(1)[0]
    question = " ".join(map(str, numbers))
    verifier = CallableVerifier(game24_verifier)
    path = ["Let me try.", f"Answer: {solve24(numbers)} = 24"]
    assert await verifier.score(metered(), question, [path]) == [[None, 1.0]]
