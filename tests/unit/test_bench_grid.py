"""The benchmark grid and its run directory, on a scripted backend whose answers follow known odds."""

import itertools
import json
import math
import random
from dataclasses import replace

import pytest

from apportion.algorithms.base import SamplingOptions
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.bench.grid import GridOptions
from apportion.bench.harness import BenchSpec, run_bench
from apportion.bench.stats import anytime_index, mean_interval, wilson
from apportion.errors import BackendError, BackendUnavailable, ConfigError
from apportion.lm.scripted import Reply, ScriptedBackend


def problems(n: int) -> list[Problem]:
    return [Problem(str(i), f"Question number {i}: what is {i} plus {i}?", str(2 * i), level=str(1 + i % 3))
            for i in range(n)]


def odds(question: str) -> float:
    """Each question's chance that one sample is right, spread over 0.2..0.8."""
    i = int(question.split()[2].rstrip(":"))
    return 0.2 + 0.6 * ((i * 37) % 11) / 10


def sampler(prompt, params, call, index):
    """Seeded answers: right with the question's odds, else one of two wrong answers (so a plurality
    of right answers is likely exactly when the odds are high). Seven words whatever the answer."""
    question = prompt.messages[-1].content
    if not question.startswith("Question number"):  # the judge's prompt
        return Reply("Score: 7")
    i = int(question.split()[2].rstrip(":"))
    rng = random.Random(f"{params.seed}-{index}")
    answer = 2 * i if rng.random() < odds(question) else 2 * i + rng.choice((1, 2))
    return Reply(f"So it is. The answer is {answer}.", logprob=-rng.random())


def options(**kw) -> GridOptions:
    base = {"algorithms": ("self-consistency", "best-of-n"), "budgets": (1, 2, 4), "orders": 40,
            "sampling": SamplingOptions(max_tokens=32, system_prompt="Be brief.")}
    return GridOptions(**{**base, **kw})


async def test_run_directory_holds_bank_results_and_summary(tmp_path):
    backend = ScriptedBackend(sampler)
    qs = problems(6)
    outcome = await run_bench(BenchSpec(qs, options(), "toy", tmp_path / "run"), backend)
    run = tmp_path / "run"
    bank = SampleBank.load(run / "bank.jsonl")
    assert [e.problem for e in bank.entries] == qs and bank.k == 4
    assert len(backend.calls) == 6 and {c.params.n for c in backend.calls} == {4}  # one n=K request each
    summary = json.loads((run / "summary.json").read_text())
    assert [(r["algorithm"], r["budget"]) for r in summary["rows"]] == [
        ("self-consistency", 1), ("self-consistency", 2), ("self-consistency", 4),
        ("best-of-n", 1), ("best-of-n", 2), ("best-of-n", 4)]
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert len(results) == 6 * 6
    for row in outcome.rows:
        # every reply is 7 words; a request for b samples reads the prompt once
        assert row.output_tokens == pytest.approx(7 * row.budget)
        assert row.input_tokens == pytest.approx(sum(e.prompt_tokens for e in bank.entries) / 6)
        assert row.ci_low <= row.accuracy <= row.ci_high
        assert sum(v["questions"] for v in row.by_level.values()) == 6
        mine = [r["right"] for r in results if r["algorithm"] == row.algorithm and r["budget"] == row.budget]
        assert sum(mine) / len(mine) == pytest.approx(row.accuracy)
    # one Anytime Index per curve, over its budgets, per generation and per token
    assert [(a["algorithm"], a["budgets"]) for a in summary["anytime"]] == [
        ("self-consistency", [1, 2, 4]), ("best-of-n", [1, 2, 4])]
    for series in summary["anytime"]:
        rows = [r for r in outcome.rows if r.algorithm == series["algorithm"]]
        assert series["per_generation"] == pytest.approx(anytime_index([(r.budget, r.accuracy) for r in rows]))
        assert series["per_token"] == pytest.approx(anytime_index([(r.tokens, r.accuracy) for r in rows]))


async def test_replay_statistics_match_live_runs(tmp_path):
    """Replayed accuracy at budget b estimates what live runs with b samples get: over 300 questions the
    two agree within sampling error (the live side is one draw; the bound is 4 of its standard errors)."""
    qs = problems(300)
    opts = options(algorithms=("self-consistency",), budgets=(1, 3, 5), orders=10)
    replayed = await run_bench(BenchSpec(qs, opts, "toy", tmp_path / "replay"), ScriptedBackend(sampler))
    live = await run_bench(BenchSpec(qs, options(algorithms=("self-consistency",), budgets=(1, 3, 5), live=True,
                                                 seed=1000, concurrency=8), "toy", tmp_path / "live"),
                           ScriptedBackend(sampler))
    for r, lv in zip(replayed.rows, live.rows):
        assert (r.mode, lv.mode, r.budget) == ("replay", "live", lv.budget)
        stderr = math.sqrt(lv.accuracy * (1 - lv.accuracy) / len(qs))
        assert abs(r.accuracy - lv.accuracy) < 4 * stderr, (r.budget, r.accuracy, lv.accuracy)
        assert r.output_tokens == pytest.approx(lv.output_tokens)
    # and majority voting does help on these odds, so the comparison is not between flat lines
    assert replayed.rows[-1].accuracy > replayed.rows[0].accuracy + 0.05


async def test_a_cut_off_draw_resumes_with_the_same_samples(tmp_path):
    qs = problems(5)
    whole = await run_bench(BenchSpec(qs, options(), "toy", tmp_path / "whole"), ScriptedBackend(sampler))

    def failing(prompt, params, call, index):
        if call == 3:
            return Reply("", error=BackendError("server went away"))
        return sampler(prompt, params, call, index)

    with pytest.raises(BackendError):
        await run_bench(BenchSpec(qs, options(), "toy", tmp_path / "cut"), ScriptedBackend(failing))
    kept = SampleBank.load(tmp_path / "cut" / "bank.jsonl").entries
    assert "3" not in {e.problem.id for e in kept} and len(kept) >= 3  # what finished is kept
    again = ScriptedBackend(sampler)
    resumed = await run_bench(BenchSpec(qs, options(), "toy", tmp_path / "cut", resume=True), again)
    assert len(again.calls) == 5 - len(kept)
    texts = [[s.text for s in e.samples] for e in SampleBank.load(tmp_path / "cut" / "bank.jsonl").entries]
    assert texts == [[s.text for s in e.samples] for e in SampleBank.load(tmp_path / "whole" / "bank.jsonl").entries]
    assert [r.accuracy for r in resumed.rows] == [r.accuracy for r in whole.rows]


async def test_resume_refuses_a_bank_drawn_differently(tmp_path):
    qs = problems(2)
    await run_bench(BenchSpec(qs, options(), "toy", tmp_path / "run"), ScriptedBackend(sampler))
    with pytest.raises(ConfigError, match="seed"):
        await run_bench(BenchSpec(qs, options(seed=5), "toy", tmp_path / "run", resume=True),
                        ScriptedBackend(sampler))


async def test_live_only_cells_and_judge_scorer_run_live(tmp_path):
    backend = ScriptedBackend(sampler)
    opts = options(algorithms=("best-of-n",), budgets=(2,), scorer="judge")
    assert not opts.replayed("best-of-n") and opts.replayed("self-consistency")
    outcome = await run_bench(BenchSpec(problems(2), opts, "toy", tmp_path / "run"), backend)
    assert [r.mode for r in outcome.rows] == ["live"]
    assert (tmp_path / "run" / "samples.jsonl").is_file() and not (tmp_path / "run" / "bank.jsonl").exists()


async def test_a_given_bank_cannot_serve_live_cells(tmp_path):
    bank_run = await run_bench(BenchSpec(problems(2), options(), "toy", tmp_path / "a"), ScriptedBackend(sampler))
    assert bank_run.rows
    bank = SampleBank.load(tmp_path / "a" / "bank.jsonl")
    with pytest.raises(ConfigError, match="need a model"):
        await run_bench(BenchSpec(problems(2), options(scorer="judge"), "toy", tmp_path / "b", bank=bank), None)
    with pytest.raises(ConfigError, match="exceeds the bank"):
        await run_bench(BenchSpec(problems(2), options(budgets=(8,)), "toy", tmp_path / "c", bank=bank), None)


@pytest.mark.parametrize("bad", [{"budgets": ()}, {"budgets": (0, 2)}, {"budgets": (2, 2)},
                                 {"algorithms": ("magic",)}, {"scorer": "oracle"}, {"orders": 0}])
def test_grid_options_reject_bad_input(bad):
    with pytest.raises(ConfigError):
        options(**bad)


def test_anytime_index_by_hand():
    # slopes 0.10/1, 0.10/2, 0.05/4 over three increments: (0.1 + 0.05 + 0.0125) / 3
    assert anytime_index([(1, 0.2), (2, 0.3), (4, 0.4), (8, 0.45)]) == pytest.approx(0.1625 / 3)
    # the same curve against tokens, 100 per generation: slopes a hundredth as steep
    assert anytime_index([(100, 0.2), (200, 0.3), (400, 0.4), (800, 0.45)]) == pytest.approx(0.001625 / 3)
    assert anytime_index([(1, 0.5), (3, 0.3)]) == pytest.approx(-0.1)  # a curve that falls has a negative AI
    assert anytime_index([(4, 0.5)]) is None and anytime_index([]) is None
    assert anytime_index([(0, 0.2), (0, 0.3)]) is None  # no token counts: no increment to divide by


def test_pass_at_k_and_the_oracle_curve_by_hand():
    from apportion.bench.oracle import oracle_curve, pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # one right sample of four, then none of four: pass@k is k/4 for the first, 0 for the second
    right, wrong = Problem("a", "q1", "7"), Problem("b", "q2", "9")
    bank = SampleBank([
        BankEntry(right, tuple(BankSample(f"t{i}", a, t) for i, (a, t) in
                               enumerate(zip(["7", "3", None, "3"], [10, 20, 30, 40]))), 7),
        BankEntry(wrong, tuple(BankSample("t", "1", 5) for _ in range(4)), 9)])
    points = oracle_curve(bank)
    assert [p.budget for p in points] == [1, 2, 3, 4]
    assert [p.accuracy for p in points] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    # k samples of mean output 25 and 5; the prompts (7 and 9) read once
    assert [p.output_tokens for p in points] == pytest.approx([15, 30, 45, 60])
    assert {p.input_tokens for p in points} == {8}


def test_intervals():
    low, high = wilson(0, 10)
    assert low == 0 and 0.25 < high < 0.35
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.404, abs=1e-3) and high == pytest.approx(0.596, abs=1e-3)
    # all-or-nothing rates are outcomes: Wilson's interval, not a zero-width normal one
    assert mean_interval([1.0] * 20) == wilson(20, 20)
    low, high = mean_interval([0.5, 0.6, 0.4, 0.5])
    assert low < 0.5 < high and high - low < 0.2


async def test_a_draw_killed_mid_line_resumes_cleanly(tmp_path):
    qs = problems(4)
    await run_bench(BenchSpec(qs[:2], options(), "toy", tmp_path), ScriptedBackend(sampler))
    path = tmp_path / "bank.jsonl"
    path.write_text(path.read_text() + '{"problem": {"id": "2", "quest')  # killed while writing entry 3
    assert len(SampleBank.load(path).entries) == 2
    again = ScriptedBackend(sampler)
    await run_bench(BenchSpec(qs, options(), "toy", tmp_path, resume=True), again)
    assert len(again.calls) == 2 and [e.problem.id for e in SampleBank.load(path).entries] == ["0", "1", "2", "3"]


async def test_resume_refuses_another_dataset(tmp_path):
    await run_bench(BenchSpec(problems(2), options(), "toy", tmp_path), ScriptedBackend(sampler))
    with pytest.raises(ConfigError, match="dataset"):
        await run_bench(BenchSpec(problems(2), options(), "other", tmp_path, resume=True), ScriptedBackend(sampler))


async def test_setup_errors_come_before_any_sampling(tmp_path):
    backend = ScriptedBackend(sampler)
    with pytest.raises(ConfigError, match="scores"):
        await run_bench(BenchSpec(problems(2), options(scorer="bank"), "toy", tmp_path / "a"), backend)
    with pytest.raises(ConfigError, match="replay' or 'live'"):
        await run_bench(BenchSpec(problems(2), options(), "toy", tmp_path / "b", peers=("its_hub",),
                                  peer_endpoint="sideways"), backend)
    assert backend.calls == []


class Short(ScriptedBackend):
    """Returns one sample fewer than asked; fails a request for a single sample."""

    async def generate(self, prompt, params, *, deadline=None):
        if params.n == 1:
            raise BackendUnavailable("the server gave up")
        return await super().generate(prompt, replace(params, n=params.n - 1), deadline=deadline)


async def test_short_replies_are_made_up_and_a_bank_that_stays_short_is_caught_at_once(tmp_path):
    class Shortish(Short):
        async def generate(self, prompt, params, *, deadline=None):
            if params.n == 1:
                return await ScriptedBackend.generate(self, prompt, params, deadline=deadline)
            return await super().generate(prompt, params, deadline=deadline)

    lm = Shortish(sampler)
    await run_bench(BenchSpec(problems(2), options(), "toy", tmp_path / "made-up"), lm)
    assert [c.params.n for c in lm.calls] == [3, 1, 3, 1]  # each short reply (3 of 4) made up by one request
    with pytest.raises(BackendError, match="asked for 4 samples, got 3: the server gave up"):
        await run_bench(BenchSpec(problems(2), options(), "toy", tmp_path / "short"), Short(sampler))


async def test_stopping_rules_replay_with_the_live_code_beside_the_full_bank(tmp_path):
    from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
    from apportion.algorithms.stopping import ESC, parse_stop
    from apportion.bench.grid import bank_prompt
    from apportion.budget.units import Budget
    from apportion.lm.replay import ReplayBackend

    qs = problems(8)
    opts = options(algorithms=("self-consistency", "best-of-n"), budgets=(1, 4), orders=5,
                   stops=(ESC(window=2), parse_stop("beta+give-up")))
    outcome = await run_bench(BenchSpec(qs, opts, "toy", tmp_path / "run"), ScriptedBackend(sampler))
    labels = [(r.algorithm, r.budget) for r in outcome.rows]
    assert ("self-consistency --stop esc:window=2", 4) in labels
    assert ("best-of-n --stop beta:threshold=0.95,round=2,draws=4000+give-up:min_samples=6,max_share=0.34,round=2",
            4) in labels
    esc_row = next(r for r in outcome.rows if r.algorithm == "self-consistency --stop esc:window=2")
    full = next(r for r in outcome.rows if r.algorithm == "self-consistency" and r.budget == 4)
    assert esc_row.output_tokens <= full.output_tokens and "samples per question" in esc_row.notes[0]
    # the generations it used, as a number beside the note's text; its share of the full budget's tokens
    assert esc_row.generations is not None and 1 <= esc_row.generations <= 4
    assert f"{esc_row.generations:.2f} of 4 samples" in esc_row.notes[0]
    share = 100 * esc_row.output_tokens / full.output_tokens
    assert esc_row.notes[1].startswith(f"{share:.1f}% of the full budget's output tokens")
    # the oracle ceiling of the bank: pass@k at every k, over the tokens uniform sampling spends there
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    oracle = summary["oracle"]["points"]
    assert [p["budget"] for p in oracle] == [1, 2, 3, 4]
    assert all(a["accuracy"] <= b["accuracy"] for a, b in itertools.pairwise(oracle))
    assert oracle[3]["output_tokens"] == pytest.approx(full.output_tokens)
    assert oracle[3]["accuracy"] >= full.accuracy
    # the first order of the row is a live run of the algorithm on the replay backend with that seed
    bank = SampleBank.load(tmp_path / "run" / "bank.jsonl")
    live = ReplayBackend(bank, seed=opts.seed)
    algo = SelfConsistency(SelfConsistencyOptions(opts.sampling, ESC(window=2)))
    first = await algo.run(live, bank_prompt(qs[0], opts.sampling), Budget(generations=4))
    results = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    esc_q0 = next(r for r in results if r["algorithm"] == esc_row.algorithm and r["question_id"] == "0")
    assert esc_q0["answer"] == first.answer


async def test_stopping_rules_need_a_replayed_algorithm(tmp_path):
    from apportion.algorithms.stopping import ESC

    with pytest.raises(ConfigError, match="--stop is replayed"):
        await run_bench(BenchSpec(problems(2), options(live=True, stops=(ESC(),)), "toy", tmp_path / "r"),
                        ScriptedBackend(sampler))
