"""Template and strategy chosen together, on hand-made banks whose every pair's accuracy is known.

Each question has four samples and the budget is four, so every order gives the same vote: self-
consistency takes the majority, best-of-N the most confident sample (self-certainty). Over ten
question types repeated in both folds:

- plain: SC right on 6 of 10, best-of-N on 4;
- cod:   SC right on 5 of 10, best-of-N on 9.

The best template under SC is plain, the best strategy on plain is SC, and yet the best pair is
cod with best-of-N.
"""

import json

import pytest
from typer.testing import CliRunner

from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.bench.joint import JointSetup, compare_joint, folds
from apportion.budget.units import Budget
from apportion.errors import ConfigError

N = 20
RIGHT, WRONG = "right", "wrong"


def sample(question: int, which: str, logprob: float, tokens: int = 10) -> BankSample:
    answer = str(question + 10) if which == RIGHT else str(question + 100)
    return BankSample(f"The answer is {answer}.", answer, tokens, (logprob,) * tokens)


def kind(question: int) -> int:
    """The question's type, 0-9; both folds (even and odd positions) hold each type once."""
    return (question // 2) % 10


# (majority right?, most confident right?) as four samples
SHAPES = {
    (True, False): [(RIGHT, -0.5), (RIGHT, -0.5), (RIGHT, -0.5), (WRONG, -0.1)],
    (False, True): [(WRONG, -0.5), (WRONG, -0.5), (WRONG, -0.5), (RIGHT, -0.1)],
    (True, True): [(RIGHT, -0.1), (RIGHT, -0.5), (RIGHT, -0.5), (WRONG, -0.5)],
    (False, False): [(WRONG, -0.1), (WRONG, -0.5), (WRONG, -0.5), (RIGHT, -0.6)],
}


def plain_shape(q: int) -> tuple[bool, bool]:
    return (True, False) if kind(q) < 6 else (False, True)


def cod_shape(q: int) -> tuple[bool, bool]:
    return (True, True) if kind(q) < 5 else (False, True) if kind(q) < 9 else (False, False)


def bank(mode: str | None, shape, *, tokens: int = 10, k: int = 4, questions: int = N) -> SampleBank:
    entries = []
    for q in range(questions):
        samples = [sample(q, which, lp, tokens) for which, lp in SHAPES[shape(q)]]
        entries.append(BankEntry(Problem(str(q), f"Question {q}: what is {q} plus 10?", str(q + 10)),
                                 tuple(samples * (k // 4)), 12))
    meta = {"sampling": {"max_tokens": 64, "system_prompt": "Be brief."}}
    return SampleBank(entries, {**meta, "prompt_mode": mode} if mode else meta)


def setup(banks, algorithms=("self-consistency", "best-of-n"), budget="gen=4", **kw) -> JointSetup:
    return JointSetup(banks, tuple(algorithms), Budget.parse(budget), orders=kw.pop("orders", 3), **kw)


def by_choice(report) -> dict:
    return {r["choice"]: r for r in report["choices"]}


async def test_the_joint_choice_finds_the_pair_that_neither_choice_alone_finds():
    report = await compare_joint(setup({"plain": bank(None, plain_shape), "cod": bank("cod", cod_shape)}))
    pairs = {(r["template"], r["strategy"]): r["accuracy"] for r in report["pairs"]}
    assert pairs == pytest.approx({("plain", "self-consistency"): 0.6, ("plain", "best-of-n"): 0.4,
                                   ("cod", "self-consistency"): 0.5, ("cod", "best-of-n"): 0.9})
    rows = by_choice(report)
    assert rows["joint"]["pairs"] == [["cod", "best-of-n"]] * 2
    assert rows["joint"]["accuracy"] == pytest.approx(0.9)
    for name in ("baseline_template_best_strategy", "best_template_self_consistency", "each_chosen_alone",
                 "baseline_self_consistency"):
        assert rows[name]["pairs"] == [["plain", "self-consistency"]] * 2
        assert rows[name]["accuracy"] == pytest.approx(0.6)
        diff, low, high = rows[name]["joint_minus_this"]
        assert diff == pytest.approx(0.3) and 0 < low <= diff <= high
    low, high = rows["joint"]["interval"]
    assert low < 0.9 < high
    assert all(r["samples_per_question"] == pytest.approx(4) for r in report["choices"])
    json.dumps(report)  # all of it goes to joint.json


async def test_a_questions_own_outcome_never_picks_its_pair():
    """Spoil cod on the even fold only: the even fold's pair is still chosen on the odd fold (cod,
    best-of-N, now wrong there), while the odd fold's pair, chosen on the spoiled even fold, moves."""
    def spoiled(q: int) -> tuple[bool, bool]:
        return (False, False) if q % 2 == 0 else cod_shape(q)

    even, odd = folds(N)
    assert even == list(range(0, N, 2)) and odd == list(range(1, N, 2))
    report = await compare_joint(setup({"plain": bank(None, plain_shape), "cod": bank("cod", spoiled)}))
    joint = by_choice(report)["joint"]
    assert joint["pairs"] == [["cod", "best-of-n"], ["plain", "self-consistency"]]
    held = joint["per_question"]
    assert [held[q] for q in even] == [0.0] * len(even)  # scored by the pair the other fold chose
    assert sum(held[q] for q in odd) / len(odd) == pytest.approx(0.6)
    assert joint["accuracy"] == pytest.approx(0.3)


async def test_in_tokens_the_template_with_shorter_answers_gets_more_samples():
    banks = {"plain": bank(None, plain_shape, tokens=40, k=8), "cod": bank("cod", cod_shape, tokens=10, k=8)}
    report = await compare_joint(setup(banks, budget="tokens=120", orders=1))
    rows = {(r["template"], r["strategy"]): r for r in report["pairs"]}
    plain, cod = rows[("plain", "self-consistency")], rows[("cod", "self-consistency")]
    assert cod["samples_per_question"] > 2 * plain["samples_per_question"]
    assert cod["capped"] and not plain["capped"]  # cod drew all 8 of its samples within the budget
    for r in report["pairs"]:
        assert r["tokens_per_question"] <= 120 + 1e-9  # the same mean budget for every pair
    assert report["banks"]["cod"]["mean_output_tokens"] == 10


@pytest.mark.parametrize(("banks", "message"), [
    (lambda: {"plain": bank(None, plain_shape)}, "two templates or more"),
    (lambda: {"plain": bank(None, plain_shape), "verbose": bank("cod", cod_shape)}, "unknown template 'verbose'"),
    (lambda: {"plain": bank(None, plain_shape), "cod": bank(None, cod_shape)}, "drawn with the 'plain'"),
    (lambda: {"plain": bank(None, plain_shape), "cod": bank("cod", cod_shape, questions=N - 1)},
     "holds 19 questions"),
])
def test_bad_banks_are_refused_with_a_reason(banks, message):
    with pytest.raises(ConfigError, match=message):
        setup(banks())


def test_banks_of_other_questions_and_bad_settings_are_refused():
    other = bank("cod", cod_shape)
    other.entries[3] = BankEntry(Problem("3", "Another question?", "13"), other.entries[3].samples)
    with pytest.raises(ConfigError, match="differ at question 4"):
        setup({"plain": bank(None, plain_shape), "cod": other})
    two = {"plain": bank(None, plain_shape), "cod": bank("cod", cod_shape)}
    with pytest.raises(ConfigError, match="cannot replay strategy 'beam'"):
        setup(two, algorithms=("beam",))
    with pytest.raises(ConfigError, match="exceeds the smallest bank's 4"):
        setup(two, budget="gen=8")
    with pytest.raises(ConfigError, match="wall clock"):
        setup(two, budget="seconds=3")


def test_the_command_writes_joint_json_and_refuses_bad_input(tmp_path):
    from apportion.cli import app

    plain, cod = tmp_path / "plain.jsonl", tmp_path / "cod.jsonl"
    bank(None, plain_shape).save(plain)
    bank("cod", cod_shape).save(cod)
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "joint", "--bank", f"plain={plain}", "--bank", f"cod={cod}",
                                 "--algorithms", "self-consistency,best-of-n", "--orders", "2",
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "joint.json").read_text())
    assert by_choice(report)["joint"]["pairs"] == [["cod", "best-of-n"]] * 2
    assert report["bank_files"] == {"plain": str(plain), "cod": str(cod)}
    assert "cod + best-of-n" in result.output
    again = runner.invoke(app, ["bench", "joint", "--bank", f"plain={plain}", "--bank", f"cod={cod}",
                                "--out", str(tmp_path / "run")])
    assert again.exit_code == 2 and "never overwritten" in again.output
    for args, message in ([["--bank", str(plain)], "TEMPLATE=PATH"],
                          [["--bank", f"plain={plain}"], "two templates or more"],
                          [["--bank", f"plain={plain}", "--bank", f"plain={cod}"], "given twice"]):
        result = runner.invoke(app, ["bench", "joint", *args])
        assert result.exit_code == 2 and message in result.output, result.output
