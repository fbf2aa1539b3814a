"""Prompt modes (TALE, Chain of Draft) on the scripted backend: the wording, and what TALE's
estimate costs."""

import pytest

from apportion import BestOfN, BestOfNOptions, Budget, ChainOfDraft, SamplingOptions, SelfConsistency, Tale
from apportion.algorithms.prompting import parse_prompt_mode
from apportion.algorithms.self_consistency import SelfConsistencyOptions
from apportion.errors import ConfigError
from apportion.lm.base import Prompt
from apportion.lm.scripted import Reply, ScriptedBackend

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"


def sc(mode, **kwargs) -> SelfConsistency:
    return SelfConsistency(SelfConsistencyOptions(SamplingOptions(prompt_mode=mode, **kwargs)))


def user_text(call) -> str:
    return [m.content for m in call.prompt.messages if m.role == "user"][-1]


async def test_tale_states_a_budget_estimated_from_the_question():
    lm = ScriptedBackend(["The answer is 42"])
    result = await sc(Tale()).run(lm, QUESTION, Budget(generations=2))
    # two quantities, one operation: 30 + 25 x 1
    assert user_text(lm.calls[0]) == QUESTION + "\nLet's think step by step and use less than 55 tokens."
    assert lm.calls[0].prompt.messages[0].role == "system"  # the answer format is still asked for
    assert result.answer == "42" and result.spent.planning_generations == 0
    assert any("budget of 55 tokens" in n for n in result.notes)
    assert result.options["sampling"]["prompt_mode"]["mode"] == "tale"


def test_tale_features_clamp_and_count_quantities():
    tale = Tale(base=10, per_step=20, min_budget=16, max_budget=60)
    assert tale.from_features("What is 1 + 2 + 3 + 4?") == 60  # 3 steps: 70, clamped
    assert tale.from_features("Name a colour.") == 30  # at least one step
    assert Tale(budget=7).budget == 7


async def test_tale_asking_the_model_is_charged_as_planning_not_as_a_generation():
    def reply(prompt, params, call, i):
        return "About 80 tokens." if call == 0 else "The answer is 42"

    lm = ScriptedBackend(reply)
    result = await sc(Tale(estimator="model"), max_tokens=64).run(lm, QUESTION, Budget(generations=2, total_tokens=500))
    planning, sampling = lm.calls
    assert "Estimate how many tokens" in user_text(planning) and planning.params.temperature == 0
    assert user_text(sampling).endswith("use less than 80 tokens.")
    s = result.spent
    assert (s.generations, s.planning_generations) == (2, 1)
    assert [r.kind for r in result.trace] == ["planning", "policy"]
    assert s.total_tokens <= 500


async def test_tale_falls_back_to_the_features_when_the_model_gives_no_number():
    lm = ScriptedBackend(lambda p, params, call, i: "I cannot say." if call == 0 else "The answer is 42")
    result = await sc(Tale(estimator="model")).run(lm, QUESTION, Budget(generations=1))
    assert user_text(lm.calls[1]).endswith("use less than 55 tokens.")
    assert any("held no number" in n for n in result.notes)


async def test_chain_of_draft_limits_words_per_step_for_any_sampling_algorithm():
    lm = ScriptedBackend([Reply("17 + 25 = 42. The answer is 42")])
    options = BestOfNOptions(SamplingOptions(prompt_mode=ChainOfDraft(words=3)))
    result = await BestOfN(options).run(lm, QUESTION, Budget(generations=2))
    assert user_text(lm.calls[0]).endswith("with at most 3 words.")
    assert result.answer == "42"


async def test_prompt_modes_word_raw_prompts_and_keep_an_assistant_prefix():
    lm = ScriptedBackend(["42"])
    prompt = Prompt(text="Q: 2 + 3?\nA:", assistant_prefix=" Let me see.")
    await sc(ChainOfDraft()).run(lm, prompt, Budget(generations=1))
    sent = lm.calls[0].prompt
    assert sent.text == "Q: 2 + 3?\nA:\n" + ChainOfDraft().instruction() + "\n"
    assert sent.assistant_prefix == " Let me see."


def test_parse_prompt_mode():
    assert parse_prompt_mode("plain") is None
    assert parse_prompt_mode("tale") == Tale()
    assert parse_prompt_mode("tale:estimator=model,max=200") == Tale(estimator="model", max_budget=200)
    assert parse_prompt_mode("tale:budget=50") == Tale(budget=50)
    assert parse_prompt_mode("cod:words=4") == ChainOfDraft(words=4)
    for bad in ("tale:words=3", "cod:words=x", "tale:estimator=guess", "verbose", "plain:x=1", "cod:words"):
        with pytest.raises(ConfigError):
            parse_prompt_mode(bad)


async def test_the_prompt_bench_compares_modes_on_the_same_questions(tmp_path):
    from apportion.bench.datasets import Problem
    from apportion.bench.prompts import PromptBenchConfig, run_prompt_bench, table, write

    def reply(prompt, params, call, i):
        asked = prompt.messages[-1].content
        if "less than" in asked:
            return "The answer is 42"  # short, and always 42
        if "draft" in asked:
            return "17 + 25 = 42. The answer is 7"  # short, wrong
        return "Let us count the sheep one by one carefully now. The answer is 42"

    problems = [Problem("a", QUESTION, "42"), Problem("b", "What is 40 + 2?", "42")]
    config = PromptBenchConfig(("plain", "tale:budget=20", "cod"), sampling=SamplingOptions(max_tokens=64))
    report = await run_prompt_bench(ScriptedBackend(reply), problems, config)
    rows = {r["mode"]: r for r in report["rows"]}
    assert report["baseline"] == "plain" and rows["plain"]["accuracy"] == 1.0
    assert rows["plain"]["mean_output_tokens"] == 14 and rows["plain"]["tokens_saved"] is None
    assert rows["tale:budget=20"]["tokens_saved"] == pytest.approx(1 - 4 / 14)
    assert rows["tale:budget=20"]["accuracy_change"] == 0
    assert (rows["cod"]["accuracy_change"], rows["cod"]["only_baseline_right"]) == (-1.0, 2)
    assert report["per_question"][0]["cod"]["answer"] == "7"
    write(report, tmp_path / "p.json")
    assert "tale:budget=20" in table(report)


def test_the_prompt_bench_command_refuses_bad_modes_before_any_work():
    from typer.testing import CliRunner

    from apportion.cli import app

    result = CliRunner().invoke(app, ["bench", "prompts", "--mode", "verbose"])
    assert result.exit_code == 2 and "unknown prompt mode" in result.output
    result = CliRunner().invoke(app, ["run", "q", "--prompt-mode", "cod:words=0"])
    assert result.exit_code == 2 and "words must be >= 1" in result.output
    result = CliRunner().invoke(app, ["run", "q", "--min-thinking-tokens", "5"])
    assert result.exit_code == 2 and "budget forcing's settings" in result.output
