"""Policies replayed over a real bank; the learned estimator; the placeholder rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from apportion.algorithms.base import RunContext
from apportion.allocate.difficulty import Evidence
from apportion.allocate.learned import FEATURES, LearnedEstimator, train, training_rows, vote_features
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import placeholder_in, read_answer_for
from apportion.banks import SampleBank, from_math_cot
from apportion.bench.allocation import ReplaySetup, compare_policies, replay_policy
from apportion.budget.units import Budget
from apportion.cli import app
from apportion.errors import ConfigError
from tests.conftest import DATA

MATH_COT = DATA / "math_cot_100_samples.jsonl"


@pytest.fixture(scope="module")
def bank():
    full = from_math_cot(MATH_COT)
    return SampleBank(full.entries[:24], full.meta)


async def test_uniform_replay_matches_self_consistency_at_the_same_samples(bank):
    """Uniform in generations gives every question the same samples: the bench's usual cell."""
    from apportion.bench.replay import replay

    setup = ReplaySetup(bank, Budget(generations=4), orders=3)
    cell = await replay_policy(setup, "uniform", "self-consistency")
    point, = await replay(bank, "self-consistency", [4], orders=3)
    assert cell.per_question == pytest.approx(point.per_question)
    assert cell.generations == 4


async def test_every_policy_stays_within_the_total_and_is_paired_with_the_baselines(bank):
    setup = ReplaySetup(bank, Budget(total_tokens=1500), orders=2)
    summary = await compare_policies(setup, ["marginal-gain", "compute-optimal"], ["self-consistency", "best-of-n"])
    rows = {(r["policy"], r["algorithm"]): r for r in summary["rows"]}
    assert set(rows) >= {("uniform", "self-consistency"), ("equal-samples", "best-of-n"),
                         ("compute-optimal", "best-of-n")}
    for r in rows.values():
        assert r["tokens_per_question"] <= 1500
        assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    assert rows[("uniform", "self-consistency")]["vs_uniform_self_consistency"] == [0.0, 0.0, 0.0]
    tables = rows[("compute-optimal", "best-of-n")]["tables"]
    assert len(tables) == 2  # one per fold, each chosen on the other fold's questions


def test_bench_policy_command_writes_policies_json(tmp_path):
    full = from_math_cot(MATH_COT)
    path = tmp_path / "bank.jsonl"
    SampleBank(full.entries[:10], {"model": "m"}).save(path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["bench", "--bank", str(path), "--policy", "marginal-gain",
                                      "--algorithms", "self-consistency", "--orders", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "policies.json").read_text())
    assert summary["budget_per_question"]["generations"] == 4  # half the bank's 8 samples
    assert {r["policy"] for r in summary["rows"]} == {"uniform", "equal-samples", "marginal-gain"}
    bad = CliRunner().invoke(app, ["bench", "--bank", str(path), "--policy", "cleverest", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown policy" in bad.output


def test_learned_estimator_learns_that_agreement_means_right_and_round_trips(bank, tmp_path):
    estimator = train([("math", bank)], orders=2)
    assert estimator.examples == 24 * 8 * 2
    agreement = dict(zip(FEATURES, estimator.coef))["agreement"]
    margin = dict(zip(FEATURES, estimator.coef))["margin"]
    assert agreement + margin > 0  # on a strong model's bank, a clear majority is right more often
    settled = estimator.estimate(Evidence((4,), 0, -0.1, 300), 4)
    split = estimator.estimate(Evidence((1, 1, 1, 1), 0, -0.1, 300), 4)
    assert settled.curve[0] > split.curve[0]
    path = tmp_path / "estimator.json"
    estimator.save(path)
    assert LearnedEstimator.load(path) == estimator
    path.write_text(json.dumps({"estimator": 1, "features": ["x"], "coef": [1.0], "intercept": 0}))
    with pytest.raises(ConfigError, match="other features"):
        LearnedEstimator.load(path)


def test_training_rows_label_the_vote_of_every_prefix(bank):
    x, y = training_rows(SampleBank(bank.entries[:3], bank.meta), Equivalence(), orders=1)
    assert x.shape == (3 * 8, len(FEATURES)) and set(y.tolist()) <= {0, 1}
    votes = np.array([[3.0, 1.0, 0.0]])
    f = vote_features(votes, np.array([1.0]), -0.5, 20)[0]
    assert f[0] == pytest.approx(3 / 5) and f[1] == pytest.approx(2 / 5) and f[2] == pytest.approx(1 / 5)


def test_an_answer_that_copies_the_instructions_placeholder_is_no_answer():
    placeholder = placeholder_in("Solve the problem briefly. End with 'The answer is N'.")
    assert placeholder == "N"
    assert read_answer_for("The answer is N.", placeholder)[0] is None
    assert read_answer_for("The answer is 14.", placeholder)[0] == "14"
    assert read_answer_for("The answer is N.", None)[0] == "N"
    assert RunContext.__dataclass_fields__["placeholder"].default is None
