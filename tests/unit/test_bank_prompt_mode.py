"""Banks drawn under a prompt mode: the prompt sent is the reworded one, the bank says which mode,
and replay serves the samples for the dataset's plain question (scripted backend, no model)."""

import json
from dataclasses import replace

import pytest

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.prompting import ChainOfDraft, Tale, parse_prompt_mode, spell_prompt_mode
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.banks import Problem, SampleBank
from apportion.bench.grid import GridOptions
from apportion.bench.harness import BenchSpec, run_bench
from apportion.bench.replay import bank_prompt_mode, bank_sampling
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.replay import ReplayBackend
from apportion.lm.scripted import Reply, ScriptedBackend

QUESTIONS = [Problem(str(i), f"Tom has {i} apples and gets {i} more. How many apples?", str(2 * i))
             for i in range(1, 5)]


def drafted(prompt, params, call, index):
    """Short answers under Chain of Draft, long ones otherwise, always right."""
    text = prompt.messages[-1].content
    n = 2 * int(text.split()[2])
    if "minimum draft" in text:
        return Reply(f"{n // 2}+{n // 2}={n}. The answer is {n}.")
    return Reply(f"First we add the apples one group at a time and count them. The answer is {n}.")


def grid(mode: str, **kw) -> GridOptions:
    sampling = SamplingOptions(max_tokens=64, system_prompt="Be brief.", prompt_mode=parse_prompt_mode(mode))
    return GridOptions(**{"algorithms": ("self-consistency",), "budgets": (1, 2), "orders": 3,
                          "sampling": sampling, **kw})


async def test_a_bank_drawn_under_chain_of_draft_records_the_mode_and_the_prompt_sent(tmp_path):
    backend = ScriptedBackend(drafted)
    outcome = await run_bench(BenchSpec(QUESTIONS, grid("cod"), "toy", tmp_path / "cod"), backend)
    instruction = ChainOfDraft().instruction()
    assert all(c.prompt.messages[-1].content.endswith(instruction) for c in backend.calls)
    assert all(c.prompt.messages[0].content == "Be brief." for c in backend.calls)  # the system prompt stays
    bank = SampleBank.load(tmp_path / "cod" / "bank.jsonl")
    assert bank.meta["prompt_mode"] == "cod" and bank_prompt_mode(bank.meta) == "cod"
    for entry, problem in zip(bank.entries, QUESTIONS):
        assert entry.problem == problem  # the dataset's question, which replay matches on
        assert entry.prompt is not None and entry.prompt["messages"][-1]["content"].endswith(instruction)
    # the prompt's tokens are those of the reworded prompt, and every cell replayed
    assert all(e.prompt_tokens > len(e.problem.question.split()) + len(instruction.split()) for e in bank.entries)
    assert [r.accuracy for r in outcome.rows] == [1.0, 1.0]
    assert outcome.rows[0].output_tokens == pytest.approx(5)  # the short drafted answers


async def test_the_replay_of_a_prompt_mode_bank_is_what_a_live_run_gets(tmp_path):
    await run_bench(BenchSpec(QUESTIONS, grid("tale"), "toy", tmp_path / "tale"), ScriptedBackend(drafted))
    bank = SampleBank.load(tmp_path / "tale" / "bank.jsonl")
    assert bank.meta["prompt_mode"] == "tale"
    tale = Tale()
    assert bank.entries[0].prompt is not None
    assert bank.entries[0].prompt["messages"][-1]["content"].endswith(
        tale.instruction(tale.from_features(QUESTIONS[0].question)))
    # replayed as the harness does: the bank's own sampling, its mode dropped, the plain question asked
    sampling = bank_sampling(bank.meta, SamplingOptions())
    assert sampling.prompt_mode is None and sampling.system_prompt == "Be brief." and sampling.max_tokens == 64
    replayed = await SelfConsistency(SelfConsistencyOptions(sampling)).run(
        ReplayBackend(bank, seed=None), QUESTIONS[0].question, Budget(generations=2))
    live = await SelfConsistency(SelfConsistencyOptions(replace(sampling, prompt_mode=Tale()))).run(
        ScriptedBackend(drafted), QUESTIONS[0].question, Budget(generations=2))
    assert [c.text for c in replayed.candidates] == [c.text for c in live.candidates]
    assert replayed.spent.input_tokens == live.spent.input_tokens  # the reworded prompt's tokens


async def test_a_bank_keeps_its_mode_on_resume_and_refuses_another(tmp_path):
    await run_bench(BenchSpec(QUESTIONS[:2], grid("cod"), "toy", tmp_path / "run"), ScriptedBackend(drafted))
    with pytest.raises(ConfigError, match="sampling"):
        await run_bench(BenchSpec(QUESTIONS, grid("plain"), "toy", tmp_path / "run", resume=True),
                        ScriptedBackend(drafted))


def test_a_model_estimated_tale_budget_cannot_be_replayed_but_runs_live():
    with pytest.raises(ConfigError, match="planning call"):
        grid("tale:estimator=model")
    assert not grid("tale:estimator=model", live=True).replayed("self-consistency")
    grid("tale:estimator=model,budget=50")  # a fixed budget asks the model nothing


def test_banks_without_a_recorded_mode_were_plain_and_modes_spell_back():
    assert bank_prompt_mode({}) == "plain"
    with pytest.raises(ConfigError):
        bank_prompt_mode({"prompt_mode": "verbose"})
    for text in ("plain", "cod", "cod:words=3", "tale", "tale:estimator=model,max_budget=300"):
        assert spell_prompt_mode(parse_prompt_mode(text)) == text
    assert json.loads(json.dumps(bank_sampling({}, SamplingOptions(prompt_mode=ChainOfDraft())).prompt_mode)) is None
