"""The Pareto frontier over (cost, latency, accuracy), the utility winner, `apportion bench pareto`, and the
report's drawing of them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from apportion.bench.pareto import Weights, analyse, non_dominated, parse_weights
from apportion.bench.report import write_report
from apportion.bench.report.summary import Row
from apportion.cli import app
from apportion.errors import ConfigError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "report_run"


def row(accuracy: float, tokens: float | None = 100.0, wall: float | None = 10.0, *, usd: float | None = 0.0,
        ci: float | None = 0.05, budget: int = 1, algorithm: str = "self-consistency", questions: int = 10,
        generations: float | None = None) -> Row:
    """A summary row; ``ci`` is the half-width of its accuracy interval (None: no interval)."""
    low, high = (None, None) if ci is None else (accuracy - ci, accuracy + ci)
    return Row("apportion", algorithm, None, budget, "replay", questions, accuracy, low, high, None, None,
               None, None, tokens, usd, wall, True, 0, {}, generations)


def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def brute_force(points: list[tuple[float, ...]]) -> list[int]:
    """The definition, checked pair by pair: nothing dominates it, and no earlier point equals it."""
    kept = [i for i, p in enumerate(points)
            if not any(dominates(q, p) or (q == p and j < i) for j, q in enumerate(points) if j != i)]
    return sorted(kept, key=lambda i: (points[i], i))


# --- dominance ------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), max_size=40))
def test_non_dominated_matches_the_definition(raw: list[tuple[int, int, int]]) -> None:
    # few distinct values per coordinate, so ties and exact duplicates are common
    points = [tuple(float(x) for x in p) for p in raw]
    assert non_dominated(points) == brute_force(points)


def test_a_point_better_on_one_axis_and_worse_on_another_stays() -> None:
    # (cost, latency, -accuracy): cheap and slow, dear and fast, and one beaten by the first on every axis
    assert non_dominated([(1, 9, -0.5), (9, 1, -0.5), (2, 9, -0.4)]) == [0, 1]


def test_exact_duplicates_are_one_point_and_the_first_stands_for_them() -> None:
    assert non_dominated([(5, 5, -0.5), (1, 1, -0.1), (5, 5, -0.5)]) == [1, 0]
    assert non_dominated([(5, 5, -0.5), (5, 5, -0.5)]) == [0]


def test_non_finite_points_are_ignored() -> None:
    assert non_dominated([(math.nan, 0, 0), (1, 1, -0.5), (0, math.inf, -1)]) == [1]


# --- the frontier and utility of rows -------------------------------------------------------


def rows_strategy() -> st.SearchStrategy[list[Row]]:
    one = st.builds(lambda t, s, a, c: row(a / 4, 100.0 * t, 10.0 * s, ci=c), st.integers(1, 4), st.integers(1, 4),
                    st.integers(0, 4), st.sampled_from([None, 0.0, 0.05, 0.2]))
    return st.lists(one, min_size=1, max_size=25)


@given(rows_strategy(), st.sampled_from([0.0, 1.0, 40.0]), st.sampled_from([0.0, 0.3, 2.0]))
def test_frontier_and_winner_match_brute_force(rows: list[Row], w_cost: float, w_latency: float) -> None:
    result = analyse(rows, "tokens", Weights(cost=w_cost, latency=w_latency))
    coords = [(r.tokens or 0.0, (r.wall_seconds or 0.0) / 10, -r.accuracy) for r in rows]
    assert [p.index for p in result.frontier] == brute_force(coords)
    for p in result.frontier:
        assert list(p.ties) == [j for j, c in enumerate(coords) if c == coords[p.index] and j != p.index]

    def utility(r: Row) -> float:
        return 100 * r.accuracy - w_cost * (r.tokens or 0.0) / 1000 - w_latency * (r.wall_seconds or 0.0) / 10

    best = max(utility(r) for r in rows)
    assert result.winner.utility == pytest.approx(best)
    assert result.winner.index in [p.index for p in result.frontier]
    others = [r for j, r in enumerate(rows) if coords[j] != coords[result.winner.index]]
    if others:
        assert result.runner_up is not None and result.runner_up.utility == pytest.approx(max(map(utility, others)))
    else:
        assert result.runner_up is None and result.separated is None


def hand_made(ci: float) -> list[Row]:
    return [
        row(0.40, tokens=100, wall=20, budget=1, ci=ci),    # U = 40 - 2 * 0.1 - 0.5 * 2 = 38.8
        row(0.60, tokens=400, wall=80, budget=4, ci=ci),    # U = 60 - 0.8 - 4 = 55.2
        row(0.65, tokens=1600, wall=320, budget=16, ci=ci),  # U = 65 - 3.2 - 16 = 45.8
        row(0.55, tokens=800, wall=160, budget=8, ci=ci),   # dominated by budget 4: U = 55 - 1.6 - 8 = 45.4
    ]


def test_utility_winner_of_a_hand_made_run() -> None:
    result = analyse(hand_made(ci=0.02), "tokens", Weights(cost=2, latency=0.5))
    assert [p.row.budget for p in result.frontier] == [1, 4, 16]
    assert result.latency and result.cost.name == "tokens"
    assert result.winner.row.budget == 4 and result.winner.utility == pytest.approx(55.2)
    assert result.winner.utility_interval == pytest.approx((53.2, 57.2))  # the accuracy interval, shifted
    assert result.runner_up is not None and result.runner_up.row.budget == 16
    assert result.runner_up.utility_interval == pytest.approx((43.8, 47.8))
    assert result.separated is True and result.close == ()


def test_overlapping_intervals_leave_the_winner_not_separated() -> None:
    # no weights: the most accurate wins, 65 [61, 69] against budget 4's 60 [56, 64]
    result = analyse(hand_made(ci=0.04), "tokens")
    assert result.winner.row.budget == 16 and result.runner_up is not None and result.runner_up.row.budget == 4
    assert result.separated is False
    assert [p.row.budget for p in result.close] == [4]  # budget 8 reaches 59, under the winner's 61
    assert analyse(hand_made(ci=0.02), "tokens").separated is True  # 63 > 62


def test_equal_utility_goes_to_the_cheaper_and_ties_are_listed() -> None:
    rows = [row(0.5, tokens=200), row(0.5, tokens=100), row(0.5, tokens=100, algorithm="best-of-n")]
    result = analyse(rows, "tokens")
    assert [(p.index, p.ties) for p in result.frontier] == [(1, (2,))]
    assert result.winner.index == 1
    # the exact twin is the same point, so the runner-up is the dearer one
    assert result.runner_up is not None and result.runner_up.index == 0 and result.separated is False


def test_without_intervals_the_gap_cannot_be_judged() -> None:
    result = analyse([row(0.9, ci=None), row(0.5, tokens=50, ci=None)], "tokens")
    assert result.winner.utility_interval is None and result.separated is None


def test_cost_units() -> None:
    rows = [row(0.5, tokens=0, usd=0.002, budget=2), row(0.6, tokens=300, usd=0.001, budget=4)]
    assert analyse(rows).cost.name == "tokens"  # auto: tokens where any row counted them
    tokens = analyse(rows, "tokens")
    assert [p.index for p in tokens.points] == [1] and tokens.left_out == (0,)
    assert "1 row(s) report no tokens" in tokens.notes[0]
    usd = analyse(rows, "usd", Weights(cost=1000))  # 1,000 points per dollar: 0.2 and 0.1 points off
    assert usd.winner.index == 1 and usd.winner.utility == pytest.approx(59.0)
    generations = analyse([row(0.5, tokens=None, budget=8, generations=3.5)])
    assert generations.cost.name == "generations" and generations.winner.cost == 3.5
    with pytest.raises(ConfigError, match=r"unknown cost unit 'joules': use tokens, usd, generations"):
        analyse(rows, "joules")
    with pytest.raises(ConfigError, match=r"no row of this run reports usd"):
        analyse([row(0.5, usd=None)], "usd")


def test_latency_is_an_axis_only_where_every_row_has_a_wall_time() -> None:
    # one row without a wall time drops latency for all: then the faster row, as cheap but less
    # accurate, is dominated
    rows = [row(0.5, tokens=100, wall=None), row(0.4, tokens=100, wall=5)]
    result = analyse(rows, "tokens")
    assert not result.latency and [p.index for p in result.frontier] == [0]
    assert "1 row(s) have no wall time" in result.notes[-1]
    assert analyse([row(0.5, tokens=100, wall=10), row(0.4, tokens=100, wall=5)], "tokens").latency
    # a bank without request times records 0 seconds, which is no latency either
    assert not analyse([row(0.5, wall=0.0)]).latency
    with pytest.raises(ConfigError, match=r"a latency weight needs every row's wall time, and no row has a wall time"):
        analyse([row(0.5, wall=None)], "tokens", Weights(latency=1))


@pytest.mark.parametrize(("text", "message"), [
    ("cost=0.5,latency=0.01", None),
    ("latency=2", None),
    ("cost", r"'cost' is not NAME=NUMBER"),
    ("cost=", r"'cost=' is not NAME=NUMBER"),
    ("cost=1,,latency=1", r"'' is not NAME=NUMBER"),
    ("speed=1", r"unknown weight 'speed'; the weights are cost and latency"),
    ("cost=1,cost=2", r"cost is given twice"),
    ("cost=cheap", r"cost='cheap' is not a number"),
    ("cost=-1", r"cost=-1 must be a finite number of 0 or more"),
    ("latency=nan", r"latency=nan must be a finite number"),
    ("latency=inf", r"latency=inf must be a finite number"),
])
def test_parse_weights(text: str, message: str | None) -> None:
    if message is None:
        parsed = parse_weights(text)
        assert parsed == {"cost=0.5,latency=0.01": Weights(0.5, 0.01), "latency=2": Weights(0, 2)}[text]
        return
    with pytest.raises(ConfigError, match=message):
        parse_weights(text)


def test_weights_refuse_negatives_from_python_too() -> None:
    with pytest.raises(ConfigError, match=r"weight cost=-0.5 must be"):
        Weights(cost=-0.5)


# --- the command ----------------------------------------------------------------------------


def fixture_run(root: Path, edit: Any = None) -> Path:
    summary = json.loads((FIXTURE / "summary.json").read_text())
    if edit is not None:
        edit(summary)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", "pareto", *args])


def test_the_command_prints_the_frontier_and_winner_and_writes_pareto_json(tmp_path: Path) -> None:
    run = fixture_run(tmp_path / "run")
    result = invoke(str(run), "--weights", "cost=20")
    assert result.exit_code == 0, result.output
    assert "Pareto frontier over mean tokens, seconds per question, accuracy" in result.stdout
    assert "* winner: apportion: self-consistency @1: U = 13.4 [7.7, 19.1]" in result.stdout
    saved = json.loads((run / "pareto.json").read_text())
    assert (saved["cost"], saved["weights"]["cost"], saved["winner"]["budget"]) == ("tokens", 20.0, 1)
    assert saved["weights"]["units"]["cost"] == "accuracy points per 1,000 tokens"
    assert [p["row"] for p in saved["frontier"]] == [10, 0, 6, 2, 3, 4]
    assert saved["frontier"][1]["ties"] == [5]  # best-of-n @1 is exactly self-consistency @1


def test_the_command_prints_json_on_request(tmp_path: Path) -> None:
    run = fixture_run(tmp_path / "run")
    result = invoke(str(run), "--json", "--cost", "generations")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((run / "pareto.json").read_text())
    assert printed["cost"] == "generations" and printed["winner"]["budget"] == 16


@pytest.mark.parametrize(("args", "message"), [
    (["--cost", "joules"], "unknown cost unit 'joules'"),
    (["--weights", "cost=-1"], "cost=-1 must be a finite number of 0 or more"),
    (["--weights", "cost:1"], "'cost:1' is not NAME=NUMBER"),
    (["--weights", "speed=1"], "unknown weight 'speed'"),
])
def test_the_command_names_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    run = fixture_run(tmp_path / "run")
    result = invoke(str(run), *args)
    assert result.exit_code == 2 and message in result.output
    assert not (run / "pareto.json").exists()


def test_the_command_needs_a_summary(tmp_path: Path) -> None:
    result = invoke(str(tmp_path))
    assert result.exit_code == 2 and "no summary.json" in result.output


def test_the_command_says_when_usd_is_missing(tmp_path: Path) -> None:
    def no_dollars(summary: dict[str, Any]) -> None:
        for r in summary["rows"]:
            r["usd"] = None

    result = invoke(str(fixture_run(tmp_path / "run", no_dollars)), "--cost", "usd")
    assert result.exit_code == 2 and "no row of this run reports usd" in result.output


# --- the report -----------------------------------------------------------------------------


def test_the_report_draws_one_panel_and_no_latency_without_wall_times(tmp_path: Path) -> None:
    def no_walls(summary: dict[str, Any]) -> None:
        for r in summary["rows"]:
            r["wall_seconds"] = None

    files = write_report(fixture_run(tmp_path / "run", no_walls))
    pareto = files.out_dir / "pareto.png"
    assert pareto in files.plots
    width = int.from_bytes(pareto.read_bytes()[16:20], "big")
    assert width == 1200  # one panel of 10 inches at 120 dpi, where latency adds a second (1440)
    page = files.html.read_text()
    assert "The frontier over cost and accuracy" in page and "Latency is left out of the frontier" in page
