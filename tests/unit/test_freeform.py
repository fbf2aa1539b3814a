"""Free-form answers (answers/freeform.py): votes over chat replies by normalised text, or by
the model judging which replies say the same thing; never by the last number in the prose."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.answers.freeform import (
    DEFAULT_SAME_SYSTEM,
    FreeFormAnswers,
    TextEquivalence,
    check_answer_mode,
    normalize_text,
    parse_answer_mode,
)
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import BackendError, ConfigError
from apportion.lm.base import Completion, Prompt, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import Reply, ScriptedBackend

QUESTION = "What is the capital of France?"
TEXT = SamplingOptions(answers="text")
JUDGE = SamplingOptions(answers="judge")


# -- normalised text --------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", ["Paris.", "paris", "The answer is Paris", "Answer: Paris", "\u201cParis!\u201d",
                                   "**Paris**", "  PARIS  ", "\uff30\uff41\uff52\uff49\uff53",
                                   "Final answer: 'Paris.'"])
def test_spellings_of_one_reply_normalise_alike(reply):
    assert normalize_text(reply) == "paris"


def test_normalised_text_keeps_the_words_and_reads_no_number():
    assert normalize_text("New   York\n\tCity.") == "new york city"
    assert normalize_text("I have 3 ideas: 1. Lyon 2. Nice 3. Paris") == "i have 3 ideas: 1. lyon 2. nice 3. paris"
    assert normalize_text("Straße") == normalize_text("STRASSE") == "strasse"  # casefold, not lower
    assert normalize_text("") is None and normalize_text(" .!? ") is None and normalize_text("The answer is.") is None


def test_text_equivalence_is_equality():
    eq = TextEquivalence()
    assert eq.cluster(["paris", "3", None, "paris", "3 apples", "3"]) == [0, 1, None, 0, 2, 1]
    assert eq.same("3", "3.0") is False and eq.key("x = 5") == "x = 5"


# -- text mode, through the registry -------------------------------------------------------------------

REPLIES = ["Paris.", "Lyon", "The answer is Paris", "I have 3 ideas: 1. Lyon 2. Nice 3. Paris", "paris", "Lyon."]


async def test_self_consistency_in_text_mode_picks_the_majority_reply():
    lm = ScriptedBackend(REPLIES)
    result = await make_algorithm("sc", TEXT).run(lm, QUESTION, Budget(generations=6), seed=1)
    assert result.answer == "paris" and result.response == "Paris."
    assert result.distribution == {"paris": 3.0, "lyon": 2.0, "i have 3 ideas: 1. lyon 2. nice 3. paris": 1.0}
    prose = result.candidates[3]
    assert prose.answer == "i have 3 ideas: 1. lyon 2. nice 3. paris" and prose.extraction == "text"
    assert prose.raw_answer == REPLIES[3] and prose.votes == 1
    assert result.options["sampling"]["answers"] == "text"
    # the math instruction ("End with 'The answer is N'") is not sent with a chat question
    assert [m.role for m in lm.calls[0].prompt.messages] == ["user"]


async def test_math_mode_is_unchanged_and_reads_the_last_number():
    lm = ScriptedBackend(REPLIES)
    result = await make_algorithm("sc").run(lm, QUESTION, Budget(generations=6), seed=1)
    assert result.candidates[3].answer == "3"  # what text mode exists to avoid
    assert lm.calls[0].prompt.messages[0].content == DEFAULT_SYSTEM_PROMPT


async def test_a_chosen_system_prompt_is_kept_in_text_mode():
    lm = ScriptedBackend(["Paris"])
    options = SamplingOptions(answers="text", system_prompt="Answer in one word.")
    await make_algorithm("sc", options).run(lm, QUESTION, Budget(generations=1))
    assert lm.calls[0].prompt.messages[0].content == "Answer in one word."


async def test_text_mode_under_a_stop_rule_and_in_debate():
    from apportion.algorithms.stopping import ESC

    lm = ScriptedBackend(["Paris.", "paris", "Paris!", "PARIS"])
    sc = SelfConsistency(SelfConsistencyOptions(TEXT, ESC(window=2)))
    result = await sc.run(lm, QUESTION, Budget(generations=8), seed=0)
    assert result.stop_reason is not None and len(result.candidates) < 8 and result.answer == "paris"

    debate = make_algorithm("debate", TEXT, settings={"agents": "3", "rounds": "0"})
    result = await debate.run(ScriptedBackend(["Lyon", "Paris.", "paris"]), QUESTION, Budget(generations=3))
    assert result.answer == "paris" and result.distribution == {"paris": 2.0, "lyon": 1.0}


# -- judge mode ---------------------------------------------------------------------------------------

MEANING = {"it's paris": "P", "paris is the capital": "P", "paris": "P", "lyon, i think": "L", "lyon": "L"}
POLICY = ["It's Paris.", "Lyon, I think.", "Paris is the capital.", "Lyon", "It's Paris.", "Paris"]
_PAIR = re.compile(r"Response A:\n(.*)\n\nResponse B:\n(.*)\n\nDo responses", re.S)


def is_judge(prompt: Prompt) -> bool:
    return prompt.messages[0].content == DEFAULT_SAME_SYSTEM


def judged_pair(prompt: Prompt) -> tuple[str, str]:
    found = _PAIR.search(prompt.messages[-1].content)
    assert found is not None
    return found.group(1), found.group(2)


def script(policy=POLICY, verdict=None):
    """Policy samples from ``policy`` in order; a judge call answers by ``MEANING`` (or ``verdict``)."""
    drawn = iter(range(10**6))

    def reply(prompt, params, call, i):
        if not is_judge(prompt):
            return policy[next(drawn) % len(policy)]
        a, b = judged_pair(prompt)
        if verdict is not None:
            return verdict(a, b)
        return "Yes." if MEANING[normalize_text(a)] == MEANING[normalize_text(b)] else "No, they differ."
    return reply


class InFlight(ScriptedBackend):
    """Counts the judge calls in flight at once."""

    peak: int = 0
    _now: int = 0

    async def generate(self, prompt: Prompt, params: SamplingParams, *, deadline: float | None = None) -> Completion:
        judge = is_judge(prompt)
        self._now += judge
        self.peak = max(self.peak, self._now)
        await asyncio.sleep(0.01)
        try:
            return await super().generate(prompt, params, deadline=deadline)
        finally:
            self._now -= judge


async def test_judge_mode_clusters_replies_that_say_the_same_thing():
    lm = InFlight(script())
    result = await make_algorithm("sc", JUDGE).run(lm, QUESTION, Budget(generations=6), seed=0)
    assert result.answer == "it's paris" and result.response == "It's Paris."
    assert result.distribution == {"it's paris": 4.0, "lyon, i think": 2.0}
    assert [c.answer for c in result.candidates] == ["it's paris", "lyon, i think", "it's paris", "lyon, i think",
                                                     "it's paris", "it's paris"]
    assert [c.raw_answer for c in result.candidates] == POLICY
    assert {c.extraction for c in result.candidates} == {"judge"}
    # each new reply against each representative, never a pair twice: 0 + 1 + 2 + 2 + 0 (seen) + 2
    judge_calls = [c for c in lm.calls if is_judge(c.prompt)]
    assert len(judge_calls) == 7
    assert len({judged_pair(c.prompt) for c in judge_calls}) == 7
    assert all(c.params.temperature == 0.0 and c.params.n == 1 for c in judge_calls)
    assert lm.peak == 2  # one reply's comparisons go out together
    # charged to the run's budget as scoring, not as generations
    assert result.spent.scorer_generations == 7 and result.spent.generations == 6
    assert result.spent.calls == 8
    assert not result.notes


async def test_judge_mode_keeps_classes_across_rounds_and_asks_no_pair_again():
    lm = ScriptedBackend(script())
    options = SamplingOptions(answers="judge", batch_size=2)
    result = await make_algorithm("sc", options).run(lm, QUESTION, Budget(generations=6), seed=0)
    assert result.distribution == {"it's paris": 4.0, "lyon, i think": 2.0}
    assert result.spent.scorer_generations == 7
    assert len([c for c in lm.calls if not is_judge(c.prompt)]) == 3


async def test_resumed_candidates_are_classes_of_their_own():
    first = await make_algorithm("sc", JUDGE).run(ScriptedBackend(script(POLICY[:2])), QUESTION, Budget(generations=2))
    lm = ScriptedBackend(script(["Paris"]))
    result = await make_algorithm("sc", JUDGE).run(lm, QUESTION, Budget(generations=1), prior=first.candidates)
    assert result.distribution == {"it's paris": 2.0, "lyon, i think": 1.0}
    assert result.spent.scorer_generations == 2  # "paris" against both earlier classes


async def test_when_the_budget_refuses_a_judge_call_the_rest_is_compared_by_text():
    unlimited = ScriptedBackend(script())
    await make_algorithm("sc", JUDGE).run(unlimited, QUESTION, Budget(generations=6), seed=0)
    inputs = [await unlimited.prompt_tokens(c.prompt) for c in unlimited.calls]
    policy, judges = inputs[0], inputs[1:]
    # room for the policy call and the first three judge calls (one for "lyon, i think", two for "paris is the capital")
    budget = Budget(generations=6, input_tokens=policy + sum(judges[:3]))

    lm = ScriptedBackend(script())
    result = await make_algorithm("sc", JUDGE).run(lm, QUESTION, budget, seed=0)
    assert result.spent.scorer_generations == 3 and result.spent.input_tokens <= budget.input_tokens
    assert result.distribution == {"it's paris": 3.0, "lyon, i think": 1.0, "lyon": 1.0, "paris": 1.0}
    assert [c.extraction for c in result.candidates] == ["judge", "judge", "judge", "text", "judge", "text"]
    assert any("budget refused a same-answer judge call after 3 calls" in n and "normalised text" in n
               for n in result.notes)
    assert result.answer == "it's paris"


async def test_a_failing_judge_falls_back_to_text_and_says_why():
    def reply(prompt, params, call, i):
        if is_judge(prompt):
            return Reply("", error=BackendError("judge unavailable"))
        return POLICY[i]

    result = await make_algorithm("sc", JUDGE).run(ScriptedBackend(reply), QUESTION, Budget(generations=6), seed=0)
    assert result.distribution == {"it's paris": 2.0, "lyon, i think": 1.0, "paris is the capital": 1.0,
                                   "lyon": 1.0, "paris": 1.0}
    assert any("judge call failed (judge unavailable)" in n for n in result.notes)
    assert result.error is None


async def test_an_unclear_verdict_counts_as_different():
    lm = ScriptedBackend(script(["Paris", "paris is the capital"], verdict=lambda a, b: "Maybe."))
    result = await make_algorithm("sc", JUDGE).run(lm, QUESTION, Budget(generations=2))
    assert result.distribution == {"paris": 1.0, "paris is the capital": 1.0}
    assert any("neither yes nor no" in n for n in result.notes)


async def test_a_pair_is_judged_once_per_run():
    lm = ScriptedBackend(script())
    answers = FreeFormAnswers("judge", MeteredLM(lm, Ledger(Budget(generations=1))), QUESTION, [])
    batch = answers.candidates(lm_samples(["Paris", "It's Paris.", "Lyon"]), "m")
    first = await answers.cluster(batch)
    again = await answers.cluster(answers.candidates(lm_samples(["It's Paris.", "Lyon", "Paris"]), "m"))
    assert [c.answer for c in first] == ["paris", "paris", "lyon"]
    assert [c.answer for c in again] == ["paris", "lyon", "paris"]
    assert answers.judge_calls == 2 and len(lm.calls) == 2  # "it's paris" and "lyon" against "paris"; then none


def lm_samples(texts):
    from apportion.lm.base import Sample

    return [Sample(t, "stop", len(t.split()), None, None) for t in texts]


# -- who takes which mode -----------------------------------------------------------------------------

def test_modes_are_checked_where_they_are_given():
    assert parse_answer_mode(" Judge ") == "judge"
    with pytest.raises(ConfigError, match="unknown answer mode 'prose'; known: math, text, judge"):
        parse_answer_mode("prose")
    with pytest.raises(ConfigError, match="answers must be one of"):
        SamplingOptions(answers="prose")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="'math' reads answers as always"):
        FreeFormAnswers("math", MeteredLM(ScriptedBackend(["x"]), Ledger(Budget(generations=1))), QUESTION, [])


@pytest.mark.parametrize("name", ["budget-forcing", "tree-of-thoughts", "program-aided"])
def test_algorithms_that_read_answers_their_own_way_refuse_free_form(name):
    with pytest.raises(ConfigError, match=f"works with self-consistency.*; {name} reads its answers its own way"):
        check_answer_mode(make_algorithm(name, TEXT))


async def test_planning_takes_text_answers_but_not_a_judge():
    assert check_answer_mode(make_algorithm("planning", TEXT)) == "text"
    for name in ("planning", "planning/debate", "debate"):
        with pytest.raises(ConfigError, match="answers='judge'"):
            check_answer_mode(make_algorithm(name, JUDGE))
    with pytest.raises(ConfigError, match="beam-search reads its answers"):
        check_answer_mode(make_algorithm("planning/beam-search", TEXT))
    with pytest.raises(ConfigError, match="budget-forcing reads its answers"):  # refused when the run starts too
        await make_algorithm("budget-forcing", TEXT).run(ScriptedBackend(["x"]), QUESTION, Budget(generations=1))
    for name in ("sc", "bon", "wbon", "direct"):
        assert check_answer_mode(make_algorithm(name, JUDGE)) == "judge"


# -- the command line ---------------------------------------------------------------------------------

def test_the_command_line_votes_by_judge_over_http():
    from typer.testing import CliRunner

    from apportion.cli import app
    from tests.support.fake_openai import FakeOpenAI

    def reply(body, index):
        messages = body["messages"]
        if messages[0]["content"] == DEFAULT_SAME_SYSTEM:
            a, b = _PAIR.search(messages[-1]["content"]).groups()
            return "Yes" if MEANING[normalize_text(a)] == MEANING[normalize_text(b)] else "No"
        return POLICY[index % len(POLICY)]

    with FakeOpenAI(reply) as server:
        result = CliRunner().invoke(app, [
            "run", QUESTION, "--answers", "judge", "--budget", "gen=6", "--base-url", server.base_url,
            "--model", server.model, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "it's paris" and out["distribution"] == {"it's paris": 4.0, "lyon, i think": 2.0}
    assert out["spent"]["scorer_generations"] == 7 and out["spent"]["generations"] == 6


@pytest.mark.parametrize(("args", "message"), [
    (["--answers", "prose"], "unknown answer mode 'prose'"),
    (["--answers", "text", "-a", "beam-search", "--process-scorer", "judge"], "beam-search reads its answers"),
    (["--answers", "judge", "--total-budget", "gen=8"], "--answers text|judge goes with one algorithm"),
])
def test_the_command_line_refuses_what_free_form_answers_cannot_do(args, message):
    from typer.testing import CliRunner

    from apportion.cli import app

    result = CliRunner().invoke(app, ["run", QUESTION, "--base-url", "http://127.0.0.1:9/v1", "--model", "m", *args])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
