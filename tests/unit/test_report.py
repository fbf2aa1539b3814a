"""The report: plots and one self-contained HTML page from a benchmark run's summary.json."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.image import imread

from apportion.bench.report import (
    ReportFiles,
    build_curves,
    frontier_rows,
    load_summary,
    pareto_frontier,
    point_label,
    write_report,
)
from apportion.errors import ConfigError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "report_run"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_budget.png", "accuracy_vs_tokens.png", "pareto.png", "by_level.png")
# Worked out by hand from the fixture's (tokens, accuracy): its_hub SC@1 is the cheapest point; apportion SC@1
# and BoN@1 tie exactly, and the first listed (SC) is kept; SC@2 loses to BoN@2 at the same tokens; every
# its_hub point above budget 1 costs more than an apportion SC point that is at least as accurate.
EXPECTED_FRONTIER = ["its_hub SC@1", "SC@1", "BoN(self-certainty)@2", "SC@4", "SC@8", "SC@16"]


def fixture_summary() -> dict[str, Any]:
    return json.loads((FIXTURE / "summary.json").read_text())


def write_run(root: Path, summary: dict[str, Any] | str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = summary if isinstance(summary, str) else json.dumps(summary)
    (root / "summary.json").write_text(text)
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    run = write_run(tmp_path_factory.mktemp("run"), fixture_summary())
    return write_report(run)


class TableReader(HTMLParser):
    """The text of every cell of every table, by the table's id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_tables(page: str) -> dict[str, list[list[str]]]:
    reader = TableReader()
    reader.feed(page)
    return reader.tables


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- the files ------------------------------------------------------------------------------


def test_writes_every_plot_and_the_page_into_run_dir_report(report: ReportFiles) -> None:
    assert report.out_dir.name == "report"
    assert [p.name for p in report.plots] == list(PLOTS)
    assert report.html == report.out_dir / "report.html"
    assert sorted(p.name for p in report.out_dir.iterdir()) == sorted([*PLOTS, "report.html"])
    assert report.files == (report.html, *report.plots)


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_real_pngs_with_something_drawn(report: ReportFiles, name: str) -> None:
    path = report.out_dir / name
    data = path.read_bytes()
    # 10 x 5.6 inches at 120 dpi; the Pareto plot has a latency panel beside the cost one (12 inches) and a
    # legend of five rows, which grows the figure by 0.24 inches a row past two
    assert png_size(data) == ((1440, 758) if name == "pareto.png" else (1200, 672))
    assert len(data) > 20_000
    pixels = (imread(path)[..., :3] * 255).astype(np.uint32)
    colours = pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2]
    # lines, bands and text in several colours, not one flat fill
    assert pixels.std() > 10
    assert len(np.unique(colours)) > 50


def test_out_dir_can_be_elsewhere(tmp_path: Path) -> None:
    files = write_report(FIXTURE, tmp_path / "elsewhere" / "deep")
    assert files.out_dir == tmp_path / "elsewhere" / "deep"
    assert files.html.is_file()
    assert not (FIXTURE / "report").exists()


def test_run_dir_may_name_the_summary_file_itself(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", fixture_summary())
    files = write_report(run / "summary.json")
    assert files.out_dir == run / "report"


def test_no_by_level_plot_when_the_dataset_has_no_levels(tmp_path: Path) -> None:
    summary = fixture_summary()
    for row in summary["rows"]:
        row["by_level"] = {}
    files = write_report(write_run(tmp_path, summary))
    assert [p.name for p in files.plots] == list(PLOTS[:3])
    assert not (files.out_dir / "by_level.png").exists()


def test_rows_without_tokens_get_no_tokens_plots_and_a_frontier_over_generations(tmp_path: Path) -> None:
    summary = fixture_summary()
    for row in summary["rows"]:
        row["tokens"] = row["input_tokens"] = row["output_tokens"] = None
        row["by_level"] = {}
    files = write_report(write_run(tmp_path, summary))
    assert [p.name for p in files.plots] == ["accuracy_vs_budget.png", "pareto.png"]
    page = files.html.read_text()
    assert "Cost is mean generations per question" in page
    assert read_tables(page)["frontier"][0][3] == "1.00"


def test_builds_no_pyplot_state(tmp_path: Path) -> None:
    # in a fresh interpreter, since other tests may have imported pyplot already
    code = ("import sys; from apportion.bench.report import write_report; "
            f"write_report({str(FIXTURE)!r}, {str(tmp_path)!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the page -------------------------------------------------------------------------------


def test_page_embeds_each_plot_and_loads_nothing_from_outside(report: ReportFiles) -> None:
    page = report.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in report.plots]
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(|https?://", page)


def test_page_header_names_the_run_and_its_config(report: ReportFiles) -> None:
    pairs = dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", report.html.read_text()))
    assert {k: pairs[k] for k in ("run", "dataset", "model", "backend", "questions", "created")} == {
        "run": "math500-smollm2-2026-11-23", "dataset": "math500", "model": "SmolLM2-135M-Instruct",
        "backend": "llama.cpp (embedded)", "questions": "200", "created": "2026-11-23T10:00:00Z"}
    # nested config keys flattened with dots, lists as JSON
    assert pairs["sampling.temperature"] == "0.8"
    assert pairs["budgets"] == "[1, 2, 4, 8, 16]"


def test_page_lists_every_row_with_its_figures(report: ReportFiles) -> None:
    rows = read_tables(report.html.read_text())["rows"]
    summary = fixture_summary()
    assert len(rows) == len(summary["rows"])
    shown = {(r[0], r[1], r[2], int(r[3]), r[4]): r for r in rows}
    for raw in summary["rows"]:
        key = (raw["system"], raw["algorithm"], raw["scorer"] or "—", raw["budget"], raw["mode"])
        cells = shown[key]
        lo, hi = 100 * raw["ci_low"], 100 * raw["ci_high"]
        assert cells[5] == f"{100 * raw['accuracy']:.1f}% [{lo:.1f}, {hi:.1f}]"
        assert cells[6] == ("—" if raw["accuracy_std"] is None else f"±{100 * raw['accuracy_std']:.1f} pp (100)")
        assert cells[7] == f"{raw['input_tokens']:,.1f}"
        assert cells[8] == f"{raw['output_tokens']:,.1f}"
        assert cells[10] == ("~" if raw["wall_estimated"] else "") + f"{raw['wall_seconds']:,.1f}"
        assert cells[11] == str(raw["errors"])


def test_page_lists_the_frontier(report: ReportFiles) -> None:
    tables = read_tables(report.html.read_text())
    assert [r[0] for r in tables["frontier"]] == EXPECTED_FRONTIER
    # without weights the utility is the accuracy in points, and the most accurate row wins; 1523.2 s of
    # estimated wall time over 200 questions
    assert tables["frontier"][-1][1:] == ["apportion: self-consistency", "16", "5,062.4", "~7.62",
                                          "35.5% [28.9, 42.1]", "35.5 [28.9, 42.1]"]
    assert re.search(r'<tr class="winner"><td><span[^>]*></span>SC@16</td>', report.html.read_text())


def test_the_report_uses_the_cost_and_weights_bench_pareto_chose(tmp_path: Path) -> None:
    from apportion.bench.pareto import Weights, analyse, save

    run = write_run(tmp_path, fixture_summary())
    # 20 points per 1,000 tokens: SC@1 at 406.4 tokens scores 21.5 - 8.1 = 13.4, its_hub SC@1 21.0 - 8.0 = 13.0,
    # BoN@2 25.0 - 14.3 = 10.7; the rest cost more than they gain
    save(run, analyse(load_summary(run).rows, "tokens", Weights(cost=20)))
    page = write_report(run).html.read_text()
    assert re.search(r'<tr class="winner"><td><span[^>]*></span>SC@1</td>', page)
    assert "w_cost = 20 (accuracy points per 1,000 tokens)" in page
    (run / "pareto.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"pareto\.json is not a pareto\.json"):
        write_report(run)


def test_page_gives_each_curve_its_anytime_index(report: ReportFiles) -> None:
    rows = {r[0]: r[1:] for r in read_tables(report.html.read_text())["anytime"]}
    assert list(rows) == ["apportion: self-consistency", "apportion: best-of-n (self-certainty)",
                          "its_hub: self-consistency"]
    # By hand, apportion SC: accuracy 21.5, 24, 30.5, 34, 35.5% at 1, 2, 4, 8, 16 generations gains 2.5/1,
    # 6.5/2, 3.5/4 and 1.5/8 pp per generation, 6.8125/4 on average; its tokens grow by 310.4, 620.8,
    # 1241.6 and 2483.2 (the prompt's 96 stay), so per 1k tokens 2.5/0.3104, 6.5/0.6208, 3.5/1.2416 and
    # 1.5/2.4832, averaging 5.487.
    assert rows["apportion: self-consistency"] == ["1, 2, 4, 8, 16", "+1.703", "+5.487"]


def test_anytime_index_needs_two_budgets_and_token_counts(tmp_path: Path) -> None:
    summary = fixture_summary()
    for row in summary["rows"]:
        row["tokens"] = row["input_tokens"] = row["output_tokens"] = None
    summary["rows"] = [*summary["rows"][:5], summary["rows"][5]]  # best-of-n at one budget only
    tables = read_tables(write_report(write_run(tmp_path, summary)).html.read_text())
    assert tables["anytime"] == [["apportion: self-consistency", "1, 2, 4, 8, 16", "+1.703", "—"]]


def stop_summary(tokens: bool = True) -> dict[str, Any]:
    """The fixture with an ESC row at the full budget of 16 and the bank's oracle curve: ESC used 4 of
    16 generations, so 4 x 310.4 of SC@16's 16 x 310.4 output tokens."""
    summary = fixture_summary()
    full = summary["rows"][4]
    assert (full["algorithm"], full["budget"], full["output_tokens"]) == ("self-consistency", 16, 4966.4)
    summary["rows"].append({**full, "algorithm": "self-consistency --stop esc:window=2", "accuracy": 0.35,
                            "ci_low": 0.284, "ci_high": 0.416, "output_tokens": 1241.6, "tokens": 1337.6,
                            "generations": 4.0, "by_level": {}})
    summary["oracle"] = {"rule": "pass@k", "points": [
        {"budget": k, "accuracy": 0.215 + 0.025 * k, "input_tokens": 96.0, "output_tokens": 310.4 * k,
         "tokens": 96.0 + 310.4 * k} for k in range(1, 17)]}
    if not tokens:  # a bank without token counts (the shared MATH bank)
        for row in [*summary["rows"], *summary["oracle"]["points"]]:
            row["tokens"] = row["input_tokens"] = row["output_tokens"] = 0.0
    return summary


def test_stopping_rules_get_their_plot_and_table_beside_the_uniform_curve(tmp_path: Path) -> None:
    files = write_report(write_run(tmp_path, stop_summary()))
    assert [p.name for p in files.plots] == [*PLOTS[:3], "stopping.png", "by_level.png"]
    data = (files.out_dir / "stopping.png").read_bytes()
    assert png_size(data) == (1440, 672) and len(data) > 20_000  # two panels: generations and tokens
    tables = read_tables(files.html.read_text())
    assert tables["stopping"] == [["apportion: self-consistency --stop esc:window=2", "35.0% [28.4, 41.6]",
                                   "35.5% [28.9, 42.1]", "-0.5 pp", "4.00 of 16 (25.0%)", "1,241.6", "25.0%",
                                   "61.5% @16"]]
    # the rule's row is a point, not a curve: it has no Anytime Index
    assert "apportion: self-consistency --stop esc:window=2" not in [r[0] for r in tables["anytime"]]


def test_a_stop_row_sits_at_the_generations_it_used() -> None:
    summary = load_summary_dict(stop_summary())
    row = summary.rows[-1]
    assert (row.stop_rule, row.base_algorithm, row.budget, row.mean_generations) == (
        "esc:window=2", "self-consistency", 16, 4.0)
    assert summary.rows[0].stop_rule is None and summary.rows[0].mean_generations == 1.0
    assert [p.budget for p in summary.oracle] == list(range(1, 17))


def test_without_token_counts_the_share_is_not_0_over_0(tmp_path: Path) -> None:
    files = write_report(write_run(tmp_path, stop_summary(tokens=False)))
    assert "stopping.png" in [p.name for p in files.plots]
    assert png_size((files.out_dir / "stopping.png").read_bytes()) == (1440, 672)
    row = read_tables(files.html.read_text())["stopping"][0]
    assert row[4:7] == ["4.00 of 16 (25.0%)", "0.0", "—"]


def test_the_share_falls_back_on_the_oracle_without_a_uniform_row_at_full_budget(tmp_path: Path) -> None:
    summary = stop_summary()
    summary["rows"] = [r for r in summary["rows"] if not (r["algorithm"] == "self-consistency" and r["budget"] == 16)]
    row = read_tables(write_report(write_run(tmp_path, summary)).html.read_text())["stopping"][0]
    assert row[2:4] == ["—", "—"] and row[6] == "25.0%"  # 1241.6 of the oracle's 16 x 310.4


def test_estimated_token_counts_are_said_on_the_page_and_the_plots(tmp_path: Path) -> None:
    summary = stop_summary()
    summary["tokens_estimated"] = "output tokens of 800 samples counted with the SmolLM2-135M-Instruct tokenizer"
    page = write_report(write_run(tmp_path, summary)).html.read_text()
    pairs = dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", page))
    assert pairs["token counts"] == ("estimated: output tokens of 800 samples counted with the "
                                     "SmolLM2-135M-Instruct tokenizer")
    assert "200 questions · tokens estimated" in page  # the subtitle every plot carries too
    plain = write_report(write_run(tmp_path / "plain", fixture_summary())).html.read_text()
    assert dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", plain))["token counts"] == (
        "as the backend reported them")


def load_summary_dict(summary: dict[str, Any]) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return load_summary(write_run(Path(tmp), summary))


def test_page_escapes_everything_taken_from_the_summary(tmp_path: Path) -> None:
    summary = fixture_summary()
    summary["model"] = "<script>alert(1)</script>"
    summary["run"] = "run <b>bold</b>"
    summary["config"] = {"<img src=x onerror=alert(2)>": "\"quoted\" & <i>"}
    summary["rows"][0]["system"] = "evil<script>"
    summary["rows"][1]["scorer"] = "<iframe>"
    page = write_report(write_run(tmp_path, summary)).html.read_text()
    assert "<script" not in page and "<iframe" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&quot;quoted&quot; &amp; &lt;i&gt;" in page
    assert "evil&lt;script&gt;" in page and "&lt;iframe&gt;" in page


# --- the frontier ---------------------------------------------------------------------------


def test_frontier_drops_dominated_points_and_sorts_by_cost() -> None:
    points = [(10, 0.5), (20, 0.4), (30, 0.6), (5, 0.3), (40, 0.55)]
    assert pareto_frontier(points) == [3, 0, 2]


def test_frontier_keeps_the_better_of_equal_costs_and_the_cheaper_of_equal_values() -> None:
    # same cost: the more accurate wins; same accuracy: the cheaper wins
    assert pareto_frontier([(10, 0.4), (10, 0.5), (20, 0.5), (30, 0.7)]) == [1, 3]


def test_frontier_keeps_the_first_of_exact_duplicates() -> None:
    assert pareto_frontier([(5, 0.1), (10, 0.5), (10, 0.5)]) == [0, 1]
    assert pareto_frontier([(10, 0.5), (5, 0.1), (10, 0.5)]) == [1, 0]


def test_frontier_of_nothing_and_of_one_point() -> None:
    assert pareto_frontier([]) == []
    assert pareto_frontier([(3, 0.2)]) == [0]


def test_frontier_ignores_non_finite_points() -> None:
    assert pareto_frontier([(math.nan, 0.9), (10, 0.5), (math.inf, 1.0), (20, math.nan)]) == [1]


def test_a_point_that_is_both_cheapest_and_best_is_the_whole_frontier() -> None:
    assert pareto_frontier([(10, 0.2), (1, 0.9), (5, 0.5)]) == [1]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=30))
def test_frontier_matches_the_definition(raw: list[tuple[int, int]]) -> None:
    points = [(float(c), v / 20) for c, v in raw]

    def beaten(i: int) -> bool:
        ci, vi = points[i]
        return any((cj <= ci and vj >= vi and (cj, vj) != (ci, vi)) or ((cj, vj) == (ci, vi) and j < i)
                   for j, (cj, vj) in enumerate(points) if j != i)

    expected = sorted((i for i in range(len(points)) if not beaten(i)), key=lambda i: points[i][0])
    assert pareto_frontier(points) == expected


def test_frontier_rows_skip_rows_without_tokens(tmp_path: Path) -> None:
    summary = fixture_summary()
    summary["rows"][10]["tokens"] = 0  # its_hub SC@1, the cheapest: zero cannot sit on a log axis
    rows = load_summary(write_run(tmp_path, summary)).rows
    assert [point_label(r) for r in frontier_rows(rows)] == EXPECTED_FRONTIER[1:]


# --- curves and labels ----------------------------------------------------------------------


def test_curves_group_rows_by_system_algorithm_and_scorer() -> None:
    rows = load_summary(FIXTURE).rows
    curves = build_curves(reversed(rows))
    assert sorted(c.label for c in curves) == [
        "apportion: best-of-n (self-certainty)", "apportion: self-consistency", "its_hub: self-consistency"]
    for curve in curves:
        assert [r.budget for r in curve.rows] == [1, 2, 4, 8, 16]
        assert curve.peer == (curve.rows[0].system != "apportion")
    assert len({c.color for c in curves}) == len(curves)


def test_a_curve_measured_twice_at_one_budget_splits_by_mode(tmp_path: Path) -> None:
    summary = fixture_summary()
    summary["rows"] = [*summary["rows"][:5], {**summary["rows"][2], "mode": "live", "accuracy": 0.29}]
    curves = build_curves(load_summary(write_run(tmp_path, summary)).rows)
    assert [(c.label, len(c.rows)) for c in curves] == [
        ("apportion: self-consistency (replay)", 5), ("apportion: self-consistency (live)", 1)]


def test_point_labels() -> None:
    rows = {(r.system, r.algorithm, r.budget): r for r in load_summary(FIXTURE).rows}
    assert point_label(rows["apportion", "self-consistency", 8]) == "SC@8"
    assert point_label(rows["apportion", "best-of-n", 4]) == "BoN(self-certainty)@4"
    assert point_label(rows["its_hub", "self-consistency", 16]) == "its_hub SC@16"


# --- bad input ------------------------------------------------------------------------------


def test_missing_summary_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no summary\.json"):
        write_report(tmp_path)
    with pytest.raises(ConfigError, match=r"no summary\.json"):
        write_report(tmp_path / "absent")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", r"not valid JSON"),
    ("[1, 2]", r"must hold a JSON object"),
    (json.dumps({"version": 1, "rows": []}), r"has no rows"),
    (json.dumps({"version": 1}), r"has no rows"),
    (json.dumps({"version": 2, "rows": [{}]}), r"summary version 2"),
    (json.dumps({"rows": [{"system": "a", "algorithm": "sc", "budget": 1}]}), r"row 0 lacks 'accuracy'"),
    (json.dumps({"rows": ["x"]}), r"row 0 must be an object"),
    (json.dumps({"rows": [{"system": "a", "algorithm": "sc", "budget": 0, "accuracy": 0.5}]}), r"'budget' must be"),
    (json.dumps({"rows": [{"system": "a", "algorithm": "sc", "budget": 2.5, "accuracy": 0.5}]}), r"whole number"),
    (json.dumps({"rows": [{"system": "a", "algorithm": "sc", "budget": 1, "accuracy": "high"}]}), r"must be a number"),
])
def test_invalid_summary_is_a_config_error_naming_the_problem(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_report(write_run(tmp_path, content))


def test_a_bad_row_is_named_by_its_index(tmp_path: Path) -> None:
    summary = fixture_summary()
    broken = copy.deepcopy(summary["rows"][3])
    del broken["algorithm"]
    summary["rows"].append(broken)
    with pytest.raises(ConfigError, match=r"row 15 lacks 'algorithm'"):
        load_summary(write_run(tmp_path, summary))


def test_a_run_in_pieces_is_reported_as_one(tmp_path: Path, report: ReportFiles) -> None:
    """The fixture split in two runs (its_hub apart, as a peer run would be) gives the page of the whole."""
    whole = fixture_summary()
    ours, peer = copy.deepcopy(whole), copy.deepcopy(whole)
    ours["rows"] = [r for r in whole["rows"] if r["system"] != "its_hub"]
    peer["rows"] = [r for r in whole["rows"] if r["system"] == "its_hub"]
    peer["run"], peer["backend"] = "peer-run", "llama_cpp.server"
    runs = [write_run(tmp_path / "ours", ours), write_run(tmp_path / "peer", peer)]
    files = write_report(runs, tmp_path / "both")
    merged, single = read_tables(files.html.read_text()), read_tables(report.html.read_text())
    assert sorted(merged["rows"]) == sorted(single["rows"]) and merged["frontier"] == single["frontier"]
    assert [r[0] for r in merged["frontier"]] == EXPECTED_FRONTIER
    assert f"{whole['run']} + peer-run" in files.html.read_text()
    with pytest.raises(ConfigError, match="give --out"):
        write_report(runs)
    with pytest.raises(ConfigError, match="both measure its_hub self-consistency at budget 1"):
        write_report([runs[1], runs[1]], tmp_path / "twice")
    other = {**peer, "questions": whole["questions"] + 1}
    with pytest.raises(ConfigError, match="differ in questions"):
        write_report([runs[0], write_run(tmp_path / "other", other)], tmp_path / "x")
