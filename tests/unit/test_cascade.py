"""Several models and cascades: the models file, escalation, dollars across priced backends,
thresholds chosen from banks, candidates that carry their model."""

from __future__ import annotations

import asyncio
import json
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.voting import tally
from apportion.allocate.cascade import Cascade, CascadeOptions, CascadePolicy, confidence
from apportion.allocate.cascade_choice import (
    CascadeConfig,
    StageBank,
    best_single,
    best_under,
    choose,
    configurations,
    cross_fit,
    expected,
    points_from_laws,
    simulate,
)
from apportion.allocate.engine import answer_batch
from apportion.allocate.models import ModelCost, build_backends, cost_table, load_models, parse_models
from apportion.allocate.scaling import ScalingLaw
from apportion.answers.equivalence import Equivalence
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.batch import Item
from apportion.budget.units import Budget, Price
from apportion.cli import app
from apportion.errors import ConfigError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.scripted import Reply, ScriptedBackend
from tests.conftest import examples
from tests.support.fake_openai import FakeOpenAI

SAMPLING = SamplingOptions(max_tokens=12, min_tokens=1, system_prompt="Answer.")
CHEAP, DEAR = Price(1.0, 2.0), Price(4.0, 8.0)


def _answers(*values: str) -> list[str]:
    return [f"the answer is {v}" for v in values]


# -- the models file ---------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "message"), [
    ({"name": "a"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    (["smollm2"], "entry 1: expected an object"),
    ([{"price": "1,2"}], "entry 1: 'name' must be a non-empty string"),
    ([{"name": "a", "price": "1,2"}, {"name": "b"}], "entry 2 ('b'): 'price' is required"),
    ([{"name": "a", "price": "1,2", "url": "x"}], "entry 1 ('a'): unknown key(s) url"),
    ([{"name": "a", "price": "1,2", "model_path": "m.gguf", "base_url": "http://h/v1"}], "not both"),
    ([{"name": "a", "price": "1,2", "base_url": "http://h/v1"}], "'base_url' needs 'model'"),
    ([{"name": "a", "price": "cheap"}], "entry 1 ('a'): cannot read price"),
    ([{"name": "a", "price": [1, -2]}], "entry 1 ('a'): price output_per_mtok must be a number >= 0"),
    ([{"name": "a", "price": {"in": 1}}], "entry 1 ('a'): a price is"),
    ([{"name": "a", "price": "1,2"}, {"name": "a", "price": "1,2"}], "'a' is used by more than one entry"),
    ([{"name": "a", "price": "1,2", "model": "m"}, {"name": "b", "price": "1,2", "model": "m"}],
     "more than one entry reports the model name 'm'"),
    ([{"name": "a", "price": "1,2", "api_key_env": "KEY"}], "'api_key_env' is for a server"),
])
def test_models_file_errors_name_the_entry(data, message):
    with pytest.raises(ConfigError) as err:
        parse_models(data, "models.json")
    assert message in str(err.value)
    assert str(err.value).startswith("models.json")


def test_models_file_reads_every_price_form(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps([
        {"name": "small", "price": "0.01,0.02"},
        {"name": "gguf", "model_path": "weights/q.gguf", "price": [0.04, 0.08]},
        {"name": "served", "base_url": "http://127.0.0.1:9/v1", "model": "big", "price": {"input": 1, "output": 2},
         "api_key_env": "BIG_KEY"}]))
    specs = load_models(path)
    assert [s.name for s in specs] == ["small", "gguf", "served"]
    assert [s.price for s in specs] == [Price(0.01, 0.02), Price(0.04, 0.08), Price(1, 2)]
    assert [s.backend_model for s in specs] == ["small", "gguf", "big"]
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(ConfigError, match="not a JSON models file"):
        load_models(bad)
    with pytest.raises(ConfigError, match="cannot read models file"):
        load_models(tmp_path / "missing.json")


def test_backends_of_servers_carry_the_files_prices_and_a_missing_key_is_named(monkeypatch):
    specs = parse_models([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "model": "m-a", "price": "1,2"},
                          {"name": "b", "base_url": "http://127.0.0.1:9/v1", "model": "m-b", "price": "3,4",
                           "api_key_env": "APPORTION_TEST_KEY"}])
    monkeypatch.delenv("APPORTION_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"model 'b'.*APPORTION_TEST_KEY is not set"):
        build_backends(specs)
    monkeypatch.setenv("APPORTION_TEST_KEY", "k")
    backends = build_backends(specs)
    assert {n: (b.model, b.price) for n, b in backends.items()} == {"a": ("m-a", Price(1, 2)),
                                                                   "b": ("m-b", Price(3, 4))}
    missing = parse_models([{"name": "g", "model_path": "no/such/file.gguf", "price": "1,2"}])
    with pytest.raises(ConfigError, match="model 'g': model file not found"):
        build_backends(missing)


def test_cost_table_prices_one_batched_call():
    cost = ModelCost("m", Price(2.0, 4.0), prompt_tokens=50, output_tokens=100)
    rows = cost_table([cost], ks=(1, 4), max_tokens=256)
    assert rows[0]["usd"] == pytest.approx((2 * 50 + 4 * 100) / 1e6)
    assert rows[1]["usd"] == pytest.approx((2 * 50 + 4 * 400) / 1e6)  # the prompt is paid once
    assert rows[1]["worst_usd"] == pytest.approx((2 * 50 + 4 * 4 * 256) / 1e6)


# -- the cascade --------------------------------------------------------------------------------

CHEAP_SETS = {
    "unanimous": (_answers("3", "3", "3", "3"), 1.0),
    "three of four": (_answers("3", "3", "5", "3"), 0.75),
    "split": (_answers("3", "4", "3", "4"), 0.5),
    "one answer missing": ([*_answers("3", "3", "3"), "no idea"], 0.75),
}


@pytest.mark.parametrize("case", sorted(CHEAP_SETS))
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.74, 0.75, 0.76, 1.0])
def test_the_cascade_escalates_exactly_when_confidence_is_below_the_threshold(case, threshold):
    replies, sure = CHEAP_SETS[case]
    cheap = ScriptedBackend(replies, model="cheap", price=CHEAP)
    dear = ScriptedBackend(_answers("9"), model="dear", price=DEAR)
    result = Cascade([dear], CascadeOptions(SAMPLING, (4, 2), (threshold,))).run_sync(
        cheap, "What is it?", Budget(usd=1.0))
    escalated = sure < threshold
    assert bool(dear.calls) is escalated
    assert result.options["stages"][0]["confidence"] == sure
    assert result.options["stages"][0]["escalated"] is escalated
    assert result.answer == ("9" if escalated else "3")
    assert result.model == ("dear" if escalated else "cheap")
    assert result.stop_reason == (None if escalated else "confident")
    assert [c.model for c in result.candidates] == ["cheap"] * 4 + (["dear"] * 2 if escalated else [])
    assert [call.params.n for call in cheap.calls + dear.calls] == [4] + ([2] if escalated else [])  # batched


def test_vote_logprob_confidence_weighs_the_share_by_token_probability():
    cheap = ScriptedBackend([Reply("the answer is 3", logprob=-0.5), Reply("the answer is 4", logprob=-0.1)],
                            model="cheap")
    options = CascadeOptions(SAMPLING, (2, 1), (0.4,), "vote-logprob")
    dear = ScriptedBackend(_answers("9"), model="dear")
    result = Cascade([dear], options).run_sync(cheap, "q", Budget(generations=3))
    # a 1-1 tie goes to the more probable answer (4, mean log-probability -0.1): 0.5 * e^-0.1 > 0.4
    assert result.options["stages"][0]["confidence"] == pytest.approx(0.5 * 2.718281828459045 ** -0.1, rel=1e-6)
    assert result.answer == "4" and result.model == "cheap" and not dear.calls


def test_confidence_is_zero_without_an_answer_and_counts_unanswered_samples():
    eq = Equivalence()
    cheap = ScriptedBackend(["nothing here", "still nothing"], model="m")
    result = Cascade(options=CascadeOptions(SAMPLING, (2,))).run_sync(cheap, "q", Budget(generations=2))
    assert confidence(tally(result.candidates, eq)) == 0.0
    with pytest.raises(ConfigError, match="unknown confidence"):
        confidence(tally(result.candidates, eq), "vibes")


def test_an_escalation_the_budget_cannot_pay_for_leaves_the_cheap_vote():
    whole = SamplingOptions(max_tokens=12, min_tokens=12, system_prompt="Answer.")
    cheap = ScriptedBackend(_answers("3", "4"), model="cheap", price=CHEAP)
    dear = ScriptedBackend(_answers("9"), model="dear", price=DEAR)
    prompt = 4 + 6  # "Answer." and "What is it?" plus 3 tokens per message
    budget = Budget(usd=float(CHEAP.cost(prompt, 2 * 4) + DEAR.cost(prompt, 12)) * 0.99)  # not one dear sample
    result = Cascade([dear], CascadeOptions(whole, (2, 2), (0.9,))).run_sync(cheap, "What is it?", budget)
    assert not dear.calls and not result.spent.violations(budget)
    assert result.answer in ("3", "4") and result.model == "cheap"
    assert [c.model for c in result.candidates] == ["cheap", "cheap"]
    assert result.options["stages"][1] == {"model": "dear", "samples": 0, "confidence": 0.0}


def test_cascade_settings_are_checked():
    with pytest.raises(ConfigError, match="needs 1 threshold"):
        Cascade([ScriptedBackend(["x"], model="b")], CascadeOptions(SAMPLING, (2, 2)))
    with pytest.raises(ConfigError, match="but the last needs a sample count"):
        Cascade([ScriptedBackend(["x"], model="b")], CascadeOptions(SAMPLING, (), (0.5,)))
    with pytest.raises(ConfigError, match="thresholds must lie in"):
        CascadeOptions(SAMPLING, (2, 2), (1.5,))
    same = ScriptedBackend(["x"], model="a")
    with pytest.raises(ConfigError, match="distinct names"):
        Cascade([same], CascadeOptions(SAMPLING, (1, 1), (0.5,))).run_sync(ScriptedBackend(["x"], model="a"), "q",
                                                                           Budget(generations=2))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cheap_price=st.tuples(st.floats(0.01, 5), st.floats(0.01, 5)),
       dear_price=st.tuples(st.floats(0.01, 50), st.floats(0.01, 50)),
       samples=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       threshold=st.floats(0, 1),
       usd=st.floats(1e-6, 3e-4),
       answers=st.lists(st.sampled_from(["1", "2", "3", "none"]), min_size=1, max_size=6),
       lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6),
       max_tokens=st.integers(4, 24),
       batch=st.booleans())
def test_a_dollar_budget_is_never_exceeded_across_two_priced_models(cheap_price, dear_price, samples, threshold, usd,
                                                                  answers, lengths, max_tokens, batch):
    def replies(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str:
        words = " ".join(["so"] * lengths[(call + i) % len(lengths)])
        value = answers[(call * 3 + i) % len(answers)]
        return f"{words} the answer is {value}" if value != "none" else words or "hmm"

    cheap = ScriptedBackend(replies, model="cheap", price=Price(*cheap_price))
    dear = ScriptedBackend(replies, model="dear", price=Price(*dear_price), native_n=False)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=1, system_prompt="Answer.")
    if not batch:
        result = Cascade([dear], CascadeOptions(sampling, samples, (threshold,))).run_sync(cheap, "q", Budget(usd=usd))
        assert not result.spent.violations(Budget(usd=usd))
        return
    total = Budget(usd=usd * 3)
    policy = CascadePolicy(("cheap", "dear"), samples, (threshold,), window=2)
    out = asyncio.run(answer_batch(
        [Item(i + 1, i, f"question {i}") for i in range(3)], cheap, total, policy,
        lambda name: Cascade(options=CascadeOptions(sampling)), algorithm="cascade", max_tokens=max_tokens,
        system_prompt="Answer.", concurrency=2, seed=0, backends={"cheap": cheap, "dear": dear}))
    assert not out.spent.violations(total)
    assert out.spent.usd == sum((o.result.spent.usd for o in out.outcomes if o.result), Fraction(0))


# -- a cascade over a batch ---------------------------------------------------------------------

def _per_question(answers: dict[str, list[str]]):
    served: dict[str, int] = {}

    def reply(prompt: Prompt, params: SamplingParams, call: int, index: int) -> str:
        q = prompt.messages[-1].content
        n = served.get(q, 0)
        served[q] = n + 1
        return f"the answer is {answers[q][n % len(answers[q])]}"
    return reply


def _cascade_batch(cheap_answers: dict[str, list[str]], total: Budget, threshold: float):
    cheap = ScriptedBackend(_per_question(cheap_answers), model="cheap", price=CHEAP)
    dear = ScriptedBackend(_answers("7"), model="dear", price=DEAR)
    sampling = SamplingOptions(max_tokens=12, min_tokens=12, system_prompt="Answer.")
    policy = CascadePolicy(("cheap", "dear"), (4, 2), (threshold,))
    items = [Item(i + 1, i, q) for i, q in enumerate(cheap_answers)]
    return asyncio.run(answer_batch(items, cheap, total, policy, lambda name: Cascade(options=CascadeOptions(sampling)),
                                    algorithm="cascade", max_tokens=12, system_prompt="Answer.", concurrency=4,
                                    seed=0, backends={"cheap": cheap, "dear": dear}))


BATCH = {"settled a": ["1"], "split b": ["2", "3"], "leaning c": ["4", "4", "4", "5"]}


def test_a_batch_cascade_escalates_the_least_confident_first_as_far_as_the_total_goes():
    """Known by hand: after the cheap round, b (0.5) and c (0.75) are below 0.8. With room for
    one escalation at its worst case (2 dear samples of 12 tokens after a 9-token prompt) b, the
    less confident, gets it; what is left then cannot pay for one more dear sample, so c keeps
    its cheap vote."""
    free = _cascade_batch(BATCH, Budget(usd=1.0), 0.8)
    assert {o.item.prompt: o.allocation["model"] for o in free.outcomes} == \
        {"settled a": "cheap", "split b": "dear", "leaning c": "dear"}
    cheap_total = sum(r.usd for o in free.outcomes for r in o.result.trace if r.model == "cheap")
    tight = _cascade_batch(BATCH, Budget(usd=cheap_total + float(DEAR.cost(9, 2 * 12)) + 1e-12), 0.8)
    models = {o.item.prompt: {c.model for c in o.result.candidates} for o in tight.outcomes}
    assert models == {"settled a": {"cheap"}, "split b": {"cheap", "dear"}, "leaning c": {"cheap"}}
    answers = {o.item.prompt: o.result.answer for o in tight.outcomes}
    assert answers == {"settled a": "1", "split b": "7", "leaning c": "4"}  # the last model's vote, or the cheap one
    assert {o.item.prompt: o.result.model for o in tight.outcomes} == \
        {"settled a": "cheap", "split b": "dear", "leaning c": "cheap"}
    assert not tight.spent.violations(tight.budget)


def test_candidates_carry_their_model_through_a_batch():
    out = _cascade_batch(BATCH, Budget(usd=1.0), 0.8)
    for o in out.outcomes:
        assert [c.model for c in o.result.candidates] == ["cheap"] * 4 + (["dear"] * 2 if o.item.prompt != "settled a"
                                                                          else [])
        assert {r.model for r in o.result.trace} == {c.model for c in o.result.candidates}


# -- choosing from banks -----------------------------------------------------------------------

def _bank(rows: list[tuple[str, list[str]]], name: str) -> SampleBank:
    return SampleBank([BankEntry(Problem(str(i), f"question {i}", gold),
                                 tuple(BankSample(f"the answer is {a}", a, 10) for a in answers), prompt_tokens=10)
                       for i, (gold, answers) in enumerate(rows)],
                      {"model": name, "sampling": {"max_tokens": 10, "system_prompt": "Answer."}})


def _stages() -> list[StageBank]:
    """The cheap model is right and unanimous on questions 0 and 1, split and wrong on 2 and 3
    (so each fold, even and odd, has one of each); the dear one is always right. Two samples cost
    3e-5 cheap and 3e-4 dear."""
    cheap = _bank([("1", ["1", "1"]), ("2", ["2", "2"]), ("3", ["5", "6"]), ("4", ["7", "8"])], "cheap")
    dear = _bank([("1", ["1", "1"]), ("2", ["2", "2"]), ("3", ["3", "3"]), ("4", ["4", "4"])], "dear")
    return [StageBank("cheap", cheap, Price(1, 1)), StageBank("dear", dear, Price(10, 10))]


def test_the_threshold_chosen_from_banks_is_the_one_known_by_hand():
    sim = simulate(_stages(), orders=3)
    cascades = list(configurations(sim, [0, 1], [2], confidences=["vote"]))
    assert {c.thresholds for c in cascades} == {(0.0,), (0.75,), (1.0,)}  # 0, the midpoint of 0.5 and 1, and 1
    # escalating the split questions costs 3e-5 + 3e-4 / 2 = 1.8e-4 per question and makes every answer right
    best = choose(sim, cascades, budget=2e-4)
    assert best is not None and best.config.thresholds == (0.75,)
    assert (best.accuracy, best.escalated) == (1.0, 0.5) and best.usd == pytest.approx(1.8e-4)
    # below that, nothing may escalate: the cheap model alone, half right
    low = choose(sim, cascades, budget=1e-4)
    assert low is not None and low.config.thresholds == (0.0,) and low.accuracy == 0.5
    # by utility: escalation is worth its 1.5e-4 only when a point of accuracy is worth more than it costs
    assert choose(sim, cascades, weight=1_000.0).config.thresholds == (0.75,)
    assert choose(sim, cascades, weight=10_000.0).config.thresholds == (0.0,)
    for fold in cross_fit(sim, [0, 1], [2], budget=2e-4, confidences=["vote"]):
        assert fold.chosen.config.thresholds == (0.75,)
        assert set(fold.test).isdisjoint(fold.dev)
        assert fold.held_out.accuracy == 1.0


def test_cheap_many_versus_expensive_few():
    sim = simulate(_stages(), orders=2)
    assert best_single(sim, [1, 2], budget=1e-4).config == CascadeConfig((0,), (1,))  # as right as 2, cheaper
    assert best_single(sim, [1, 2], budget=4e-4).config == CascadeConfig((1,), (1,))  # ties go to the cheaper
    assert best_single(sim, [1, 2], budget=1e-6) is None
    assert expected(sim, CascadeConfig((1,), (2,))).usd == pytest.approx(3e-4)
    costs = {"cheap": ModelCost("cheap", Price(1, 1), 10, 10), "dear": ModelCost("dear", Price(10, 10), 10, 10)}
    laws = {"cheap": ScalingLaw(-0.3, -1.0, 0.5, 1, 16), "dear": ScalingLaw(-0.2, -1.0, 0.9, 1, 16)}
    points = points_from_laws(laws, costs, [1, 2, 4, 8])
    pick = best_under(points, 1.5e-4)
    assert (pick.model, pick.k) == ("cheap", 8)
    assert (best_under(points, 4e-4).model, best_under(points, 4e-4).k) == ("dear", 2)


# -- the command line ---------------------------------------------------------------------------

def test_bench_cascade_writes_its_figures(tmp_path):
    paths = []
    for stage in _stages():
        path = tmp_path / f"{stage.name}.jsonl"
        stage.bank.save(path)
        paths.append(path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["bench", "cascade", "--bank", str(paths[0]), "--bank", str(paths[1]),
                                      "--price", "1,1", "--price", "10,10", "--budgets", "usd=0.0002",
                                      "--orders", "2", "--choice-orders", "2", "--ks", "1,2", "--confidence", "vote",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "cascade.json").read_text())
    row = report["rows"][0]
    assert set(row["arms"]) == {"cheap alone", "dear alone", "cascade"}
    assert row["arms"]["cascade"]["accuracy"] == 1.0
    assert row["arms"]["cascade"]["usd_per_question"] <= 2e-4
    assert [f["chosen"]["thresholds"] for f in row["arms"]["cascade"]["folds"]] == [[0.75], [0.75]]
    assert row["arms"]["dear alone"]["usd_per_question"] <= 2e-4
    assert [f["chosen"]["samples"] for f in row["arms"]["dear alone"]["folds"]] == [[1], [1]]
    assert row["arms"]["cheap alone"]["accuracy"] == 0.5
    tight = CliRunner().invoke(app, ["bench", "cascade", "--bank", str(paths[0]), "--bank", str(paths[1]),
                                     "--price", "1,1", "--price", "10,10", "--budgets", "0.0001", "--ks", "2",
                                     "--orders", "1", "--choice-orders", "1", "--out", str(tmp_path / "tight")])
    assert tight.exit_code == 0, tight.output
    assert json.loads((tmp_path / "tight" / "cascade.json").read_text())["rows"][0]["unaffordable"] == ["dear alone"]
    again = CliRunner().invoke(app, ["bench", "cascade", "--bank", str(paths[0]), "--bank", str(paths[1]),
                                     "--price", "1,1", "--price", "10,10", "--budgets", "0.0002", "--out", str(out)])
    assert again.exit_code == 2 and "never overwritten" in again.output


def test_run_with_a_cascade_over_two_servers(tmp_path):
    with FakeOpenAI(lambda body, i: f"The answer is {3 + i % 2}.", model="small") as cheap, \
            FakeOpenAI(lambda body, i: "The answer is 9.", model="big") as dear:
        models = tmp_path / "models.json"
        models.write_text(json.dumps([
            {"name": "small", "base_url": cheap.base_url, "model": "small", "price": "1,2"},
            {"name": "big", "base_url": dear.base_url, "model": "big", "price": "4,8"}]))
        result = CliRunner().invoke(app, ["run", "What is it?", "--algorithm", "cascade", "--models", str(models),
                                          "--budget", "usd=0.01", "--cascade-samples", "2,3", "--threshold", "0.6",
                                          "--max-tokens", "16", "--json"])
        assert result.exit_code == 0, result.output
        row = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
        assert row["answer"] == "9" and row["model"] == "big"
        assert [c["model"] for c in row["candidates"]] == ["small"] * 2 + ["big"] * 3
        assert row["spent"]["usd"] <= 0.01
        unused = CliRunner().invoke(app, ["run", "q", "--algorithm", "cascade", "--models", str(models),
                                          "--price", "1,2"])
        assert unused.exit_code == 2 and "drop --price" in unused.output


def test_a_file_under_one_total_budget_with_a_cascade(tmp_path):
    def cheap_reply(body, i):
        question = body["messages"][-1]["content"]
        return "The answer is 5." if "settled" in question else f"The answer is {i % 3}."

    with FakeOpenAI(cheap_reply, model="small") as cheap, FakeOpenAI(lambda body, i: "The answer is 8.",
                                                                      model="big") as dear:
        models = tmp_path / "models.json"
        models.write_text(json.dumps([
            {"name": "small", "base_url": cheap.base_url, "model": "small", "price": "1,2"},
            {"name": "big", "base_url": dear.base_url, "model": "big", "price": "4,8"}]))
        questions = tmp_path / "q.jsonl"
        questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("settled one", "open two")))
        out = tmp_path / "answers.jsonl"
        result = CliRunner().invoke(app, ["run", "--file", str(questions), "--out", str(out), "--algorithm", "cascade",
                                          "--models", str(models), "--total-budget", "usd=0.01",
                                          "--cascade-samples", "3,2", "--threshold", "0.9", "--max-tokens", "16"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["answer"] for r in rows] == ["5", "8"]
        assert [r["allocation"]["model"] for r in rows] == ["small", "big"]
        assert [[c["model"] for c in r["candidates"]] for r in rows] == [["small"] * 3, ["small"] * 3 + ["big"] * 2]
        report = json.loads(out.with_name(out.name + ".allocation.json").read_text())
        assert report["policy"]["policy"] == "cascade" and report["spent"]["usd"] <= 0.01


def test_batch_with_models_and_the_cascade_policy(tmp_path):
    with FakeOpenAI(lambda body, i: f"The answer is {i % 2}.", model="small") as cheap, \
            FakeOpenAI(lambda body, i: "The answer is 8.", model="big") as dear:
        models = tmp_path / "models.json"
        models.write_text(json.dumps([
            {"name": "small", "base_url": cheap.base_url, "model": "small", "price": "1,2"},
            {"name": "big", "base_url": dear.base_url, "model": "big", "price": "4,8"}]))
        questions = tmp_path / "q.jsonl"
        questions.write_text(json.dumps({"question": "one"}) + "\n")
        out = tmp_path / "answers.jsonl"
        common = ["batch", str(questions), "--out", str(out), "--total-budget", "usd=0.01", "--max-tokens", "16"]
        result = CliRunner().invoke(app, [*common, "--models", str(models), "--policy", "cascade",
                                          "--cascade-samples", "2,2", "--threshold", "0.9"])
        assert result.exit_code == 0, result.output
        row = json.loads(out.read_text())
        assert row["answer"] == "8" and [c["model"] for c in row["candidates"]] == ["small"] * 2 + ["big"] * 2
    for args, message in ((["--models", str(models), "--policy", "uniform"], "--models goes with --policy cascade"),
                          (["--policy", "cascade"], "--policy cascade needs --models"),
                          (["--models", str(models), "--policy", "cascade", "--price", "1,2"], "does not take --price"),
                          (["--models", str(models), "--policy", "cascade", "--threshold", "0.5,0.6"],
                           "2 value(s); 2 models need 1")):
        bad = CliRunner().invoke(app, [*common, *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
