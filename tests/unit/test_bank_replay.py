"""Replay on the real bank of the shared data: eight sampled solutions per MATH problem with
reward-model scores. Majority@8 and reward-model best-of-8 computed from real model outputs."""

import json

import pytest

from apportion import Equivalence
from apportion.answers import normalize_answer
from apportion.banks import SampleBank, from_math_cot
from apportion.bench.datasets import load_dataset
from apportion.bench.replay import replay
from apportion.errors import ConfigError
from tests.conftest import DATA

MATH_COT = DATA / "math_cot_100_samples.jsonl"


@pytest.fixture(scope="module")
def bank():
    return from_math_cot(MATH_COT)


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in MATH_COT.read_text().splitlines()]


def test_bank_reads_every_problem_and_sample(bank):
    assert len(bank.entries) == 100 and bank.k == 8
    assert {e.problem.level for e in bank.entries} == {"1", "2", "3", "4", "5"}
    assert all(0 < s.score < 1 for e in bank.entries for s in e.samples)


def test_our_grader_agrees_with_the_sources_correctness_flags(rows):
    eq = Equivalence()
    disagreements = [(p, r["gt"], ok) for r in rows for p, ok in zip(r["pred"], r["score"])
                     if (bool(p) and eq.same(normalize_answer(p), r["gt"])) != ok]
    # the one disagreement: "10000" against gold "10{,}000", which the source marks wrong
    assert disagreements == [("10000", "10{,}000", False)]


async def test_reward_model_best_of_8(bank, rows):
    point, = await replay(bank, "best-of-n", [8], orders=3)
    # order cannot matter when all eight are used and scores are distinct
    assert point.accuracy_std == 0
    eq = Equivalence()
    expected = sum(
        eq.same(normalize_answer(r["pred"][i]), r["gt"])
        for r in rows
        for i in [max(range(8), key=lambda j: (r["pred_score"][j][-1], -j))]
    ) / len(rows)
    assert point.accuracy == pytest.approx(expected) and expected == 0.95
    assert point.by_level == {"1": 1.0, "2": 1.0, "3": 23 / 24, "4": 23 / 24, "5": 0.88}


async def test_majority_at_8_and_the_budget_curve(bank, rows):
    points = {p.budget: p for p in await replay(bank, "self-consistency", [1, 2, 4, 8], orders=40, seed=1)}
    eq = Equivalence()
    single = sum(eq.same(normalize_answer(p), r["gt"]) for r in rows for p in r["pred"] if p) / 800
    assert points[1].accuracy == pytest.approx(single, abs=0.015)  # one random sample per question
    pass_at_8 = sum(any(r["score"]) for r in rows) / 100
    assert points[1].accuracy < points[8].accuracy < pass_at_8
    assert points[8].accuracy == pytest.approx(0.926, abs=0.006)  # ties broken by order: a spread
    weighted = (await replay(bank, "weighted-best-of-n", [8], orders=3))[0]
    assert weighted.accuracy == pytest.approx(0.95)


async def test_replay_rejects_budgets_beyond_the_bank(bank):
    with pytest.raises(ConfigError, match=r"1\.\.8"):
        await replay(bank, "self-consistency", [16])
    with pytest.raises(ConfigError, match="cannot replay"):
        await replay(bank, "beam-search", [2])


def test_bank_round_trips_through_a_file(bank, tmp_path):
    path = tmp_path / "bank.jsonl"
    bank.save(path)
    again = SampleBank.load(path)
    assert again.entries == bank.entries and again.meta == bank.meta
    path.write_text('{"not": "a bank"}\n')
    with pytest.raises(ConfigError, match="not a sample bank"):
        SampleBank.load(path)


@pytest.mark.parametrize("name, count, first_answer", [
    ("gsm8k", 1319, "18"), ("math500", 500, None), ("aime24", 30, None), ("amc23", 40, None),
    ("mawps_singleop", None, "14"), ("mawps_addsub", None, None),
])
def test_named_datasets_load(name, count, first_answer):
    problems = load_dataset(name, data=DATA)
    if count is not None:
        assert len(problems) == count
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    if first_answer is not None:
        assert problems[0].answer == first_answer
    if name == "math500":
        assert {p.level for p in problems} == {"1", "2", "3", "4", "5"}


def test_jsonl_dataset_with_custom_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"q": "1+1?", "a": 2.0, "id": "x"}\n{"q": "2+2?", "a": "4"}\n')
    problems = load_dataset(str(path), question_field="q", answer_field="a")
    assert [(p.id, p.question, p.answer) for p in problems] == [("x", "1+1?", "2"), ("2", "2+2?", "4")]
    with pytest.raises(ConfigError, match="no field 'question'"):
        load_dataset(str(path))
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("no-such-dataset")


async def drawn_bank(questions: int = 12, k: int = 8) -> SampleBank:
    """A bank drawn through a (scripted) backend, as `apportion bench` will draw one."""
    import random

    from apportion.banks import Problem, bank_from_samples
    from apportion.lm import Prompt, SamplingParams
    from apportion.lm.scripted import Reply, ScriptedBackend

    rnd = random.Random(5)

    def reply(prompt, params, call, i):
        answer = rnd.choice(["7", "7", "7", "8", "9", "no idea"])
        return Reply(f"I think the answer is {answer}", logprob=-rnd.random())

    lm = ScriptedBackend(reply)
    problems = [Problem(str(q), f"What is {q} + 7 - {q}?", "7") for q in range(questions)]
    prompts = [Prompt.chat(p.question) for p in problems]
    completions = [await lm.generate(pr, SamplingParams(n=k, logprobs=True)) for pr in prompts]
    return bank_from_samples(problems, [c.samples for c in completions],
                             [c.usage.input_tokens for c in completions], [pr.to_dict() for pr in prompts],
                             {"model": "scripted"})


@pytest.mark.parametrize("algorithm, scorer", [("self-consistency", "bank"), ("best-of-n", "self-certainty"),
                                               ("weighted-best-of-n", "self-certainty")])
async def test_live_runs_on_the_replay_backend_match_replay(algorithm, scorer):
    from apportion import Budget, make_algorithm
    from apportion.lm.replay import ReplayBackend

    bank = await drawn_bank()
    eq = Equivalence()
    for seed in range(4):
        for budget in (1, 3, 8):
            lm = ReplayBackend(bank, seed=seed)
            results = [await make_algorithm(algorithm).run(lm, e.problem.question, Budget(generations=budget))
                       for e in bank.entries]
            live = sum(r.answer is not None and eq.same(r.answer, "7") for r in results) / len(results)
            tokens = sum(r.spent.output_tokens for r in results) / len(results)
            point, = await replay(bank, algorithm, [budget], orders=1, seed=seed, scorer=scorer)
            assert live == point.accuracy
            assert tokens == point.output_tokens


async def test_replay_backend_serves_without_replacement_and_refuses_strangers():
    from apportion.errors import BankExhausted, ModelNotFound
    from apportion.lm import Prompt, SamplingParams
    from apportion.lm.replay import ReplayBackend

    bank = await drawn_bank(questions=2, k=4)
    lm = ReplayBackend(bank, seed=0)
    prompt = Prompt.chat(bank.entries[0].problem.question)
    first = await lm.generate(prompt, SamplingParams(n=3))
    second = await lm.generate(prompt, SamplingParams(n=3))
    assert len(first.samples) == 3 and len(second.samples) == 1
    served = [s.text for s in first.samples + second.samples]
    assert sorted(served) == sorted(s.text for s in bank.entries[0].samples)
    with pytest.raises(BankExhausted):
        await lm.generate(prompt, SamplingParams(n=1))
    with pytest.raises(ModelNotFound, match="not in the bank"):
        await lm.generate(Prompt.chat("something else"), SamplingParams())


async def test_replay_honours_a_cut_as_a_live_decode_would():
    from apportion.banks import BankEntry, BankSample, Problem
    from apportion.lm import Prompt, SamplingParams
    from apportion.lm.replay import ReplayBackend

    confident = BankSample("so 7. The answer is 7", "7", 6, (-0.1,) * 6, confidences=(5.0,) * 6)
    shaky = BankSample("maybe 3. The answer is 3", "3", 6, (-2.0,) * 6, confidences=(5.0, 5.0, 1.0, 0.5, 5.0, 5.0))
    bank = SampleBank([BankEntry(Problem("1", "q?", "7"), (confident, shaky), 10)])
    lm = ReplayBackend(bank, seed=0)
    cut = lambda part: len(part.confidences) >= 2 and sum(part.confidences[-2:]) / 2 < 2  # noqa: E731
    completion = await lm.generate(Prompt.chat("q?"), SamplingParams(n=2, logprobs=True, top_logprobs=20, cut=cut))
    by_reason = {s.finish_reason: s for s in completion.samples}
    assert by_reason["stop"].text == confident.text and by_reason["stop"].output_tokens == 6
    assert by_reason["cut"].output_tokens == 4 and by_reason["cut"].text == ""
    assert by_reason["cut"].confidences == (5.0, 5.0, 1.0, 0.5)
    assert completion.usage.output_tokens == 10


# --- token counts for a bank that stored none ----------------------------------------------------


def test_missing_token_counts_are_filled_flagged_and_named(bank):
    from apportion.banks import ESTIMATED_KEY, count_missing_tokens, missing_token_counts

    assert missing_token_counts(bank) == 800  # the MATH bank stores texts only
    small = SampleBank(bank.entries[:2], dict(bank.meta))
    words = count_missing_tokens(small, lambda text: len(text.split()), "words")
    assert [s.output_tokens for s in words.entries[0].samples] == [len(s.text.split())
                                                                   for s in small.entries[0].samples]
    assert all(e.estimated for e in words.entries) and not any(e.estimated for e in small.entries)
    assert words.meta[ESTIMATED_KEY]["tokenizer"] == "words" and words.meta[ESTIMATED_KEY]["samples"] == 16
    assert missing_token_counts(words) == 0
    assert count_missing_tokens(words, lambda text: 1, "ones") is words  # counts already there stay


def test_without_llama_cpp_the_bank_stays_as_it_was_and_says_why(bank, monkeypatch):
    import apportion.bench.token_counts as token_counts
    from apportion.errors import ModelNotFound

    def missing(model_path=None):
        raise ModelNotFound("llama-cpp-python is not installed")

    monkeypatch.setattr(token_counts, "embedded_tokenizer", missing)
    same, why = token_counts.fill_token_counts(bank)
    assert same is bank and "800 samples" in why and "llama-cpp-python is not installed" in why
    assert "no token shares" in why


def test_the_embedded_tokenizer_counts_a_bank_without_loading_the_model(bank):
    pytest.importorskip("llama_cpp")
    from apportion.bench.token_counts import fill_token_counts
    from apportion.lm.llama_embedded import embedded_tokenizer

    tokenizer = embedded_tokenizer()
    assert embedded_tokenizer() is tokenizer  # loaded once
    assert tokenizer.name == "SmolLM2-135M-Instruct"
    assert 0 < tokenizer.count("The answer is $\\boxed{42}$.") < 20
    filled, why = fill_token_counts(SampleBank(bank.entries[:3], dict(bank.meta)))
    assert why is None and filled.meta["tokens_estimated"]["tokenizer"] == "SmolLM2-135M-Instruct"
    assert [s.output_tokens for s in filled.entries[2].samples] == [tokenizer.count(s.text)
                                                                     for s in bank.entries[2].samples]
    assert all(s.output_tokens > 0 for e in filled.entries for s in e.samples)
