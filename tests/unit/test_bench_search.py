"""Live benchmark cells for step-wise searches: the process scorer and search settings reaching the
searches, the rows' tokens, intervals and search figures, the journal that resumes a cut-off run to
the rows of an uncut one, Game of 24 judged by its verifier, and its-hub's searches on the same endpoint."""

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import ALGORITHMS
from apportion.algorithms.steps import STEP_SYSTEM_PROMPT, SearchOptions
from apportion.banks import Problem
from apportion.bench.datasets import GAME24_SYSTEM_PROMPT, judge_for, load_dataset, system_prompt_for
from apportion.bench.grid import GridOptions, canonical, is_search
from apportion.bench.harness import BenchSpec, run_bench
from apportion.bench.journal import JOURNAL_FILE
from apportion.bench.judging import Game24Judge, GoldJudge
from apportion.bench.peers import PeerSearch, its_hub
from apportion.bench.stats import bootstrap_interval
from apportion.cli import app
from apportion.cli.bench import _continued, _table
from apportion.errors import ConfigError
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.lm.scripted import Reply, ScriptedBackend
from apportion.reward.verifiers import CallableVerifier, game24_numbers, game24_verifier
from apportion.serve import ServedApp, openai_app
from tests.conftest import DATA

# -- a model that writes steps -------------------------------------------------------------------


def problems(n: int) -> list[Problem]:
    return [Problem(str(i), f"Question number {i}: what is {i} plus {i}?", str(2 * i)) for i in range(n)]


def writer(prompt, params, call, index):
    """Seeded: a search's first step is "Add them." (then the right answer) or "Guess." (then a
    wrong one, mostly); any other algorithm gets one reply, right half the time."""
    question = [m.content for m in prompt.messages if m.role == "user"][-1]
    i = int(question.split()[2].rstrip(":"))
    rng = random.Random(f"{params.seed}-{index}")
    system = prompt.messages[0].content if prompt.messages[0].role == "system" else ""
    if system == STEP_SYSTEM_PROMPT:
        if not prompt.assistant_prefix:
            return "Add them." if rng.random() < 0.5 else "Guess."
        right = "Add them." in prompt.assistant_prefix or rng.random() < 0.2
        return f"The answer is {2 * i if right else 2 * i + 1}."
    answer = 2 * i if rng.random() < 0.5 else 2 * i + 1
    return Reply(f"So it is. The answer is {answer}.", logprob=-rng.random())


def rate(question, steps):
    """The toy process scorer: a sound first step 0.9, a guess 0.2, an answer step unscored."""
    return {"Add them.": 0.9, "Guess.": 0.2}.get(steps[-1])


class Counted:
    """A process scorer factory that counts the scorers it made."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self) -> CallableVerifier:
        self.made += 1
        return CallableVerifier(rate, name="toy")


def grid(**kw) -> GridOptions:
    base = {"algorithms": ("beam-search", "self-consistency", "best-of-n"), "budgets": (2, 4), "live": True,
            "sampling": SamplingOptions(max_tokens=64), "process_scorer": Counted(),
            "search": SearchOptions(beam_width=2), "concurrency": 2}
    return GridOptions(**{**base, **kw})


def results(run) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def comparable(row):
    """A row less what depends on the clock (and the notes that say a run was resumed)."""
    return replace(row, wall_seconds=0.0, wall_estimated=False, notes=())


# -- the process scorer and the search settings --------------------------------------------------


async def test_searches_get_a_fresh_process_scorer_and_the_settings_the_rest_get_neither(tmp_path):
    factory = Counted()
    options = grid(process_scorer=factory, search=SearchOptions(beam_width=1, aggregation="min"))
    made_before = factory.made
    outcome = await run_bench(BenchSpec(problems(3), options, "toy", tmp_path), ScriptedBackend(writer))
    # one scorer per search question (2 budgets x 3 questions), besides one per cell for its label
    assert factory.made - made_before >= 6
    runs = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for run in runs:
        opts = run["result"]["options"]
        if run["algorithm"] == "beam-search":
            assert (opts["process_scorer"], opts["beam_width"], opts["aggregation"]) == ("toy", 1, "min")
            assert opts["sampling"]["system_prompt"] == STEP_SYSTEM_PROMPT  # the search's own step instruction
        else:
            assert "process_scorer" not in opts and "beam_width" not in opts
    labels = {r.algorithm: r.scorer for r in outcome.rows}
    assert labels == {"beam-search": "toy", "self-consistency": None, "best-of-n": "self-certainty"}


def test_a_search_that_needs_a_process_scorer_is_refused_without_one_before_any_work():
    with pytest.raises(ConfigError, match="beam-search needs a process scorer"):
        grid(process_scorer=None)
    grid(algorithms=("self-consistency", "best-of-n"), process_scorer=None)  # no search: nothing to refuse
    assert is_search("beam") and not is_search("self-consistency")
    # a planning run is a search where its base is one, and keeps its base in its name
    assert canonical("planning/beam") == "planning/beam-search" and is_search("planning/beam-search")
    with pytest.raises(ConfigError, match="planning/beam-search needs a process scorer"):
        grid(algorithms=("planning/beam-search",), process_scorer=None)
    if "tree-of-thoughts" in ALGORITHMS:  # values its own states: no process scorer needed
        grid(algorithms=("tree-of-thoughts",), process_scorer=None)


# -- rows ----------------------------------------------------------------------------------------


async def test_rows_give_tokens_per_question_a_bootstrap_interval_and_a_search_s_figures(tmp_path):
    outcome = await run_bench(BenchSpec(problems(5), grid(), "toy", tmp_path), ScriptedBackend(writer))
    lines = results(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for row, raw in zip(outcome.rows, summary["rows"]):
        mine = [r for r in lines if (r["algorithm"], r["budget"]) == (row.algorithm, row.budget)]
        rights = [r["right"] for r in mine]
        assert (row.ci_low, row.ci_high) == pytest.approx(bootstrap_interval(rights, draws=2000))
        assert row.input_tokens == pytest.approx(sum(r["input_tokens"] for r in mine) / 5)
        assert row.tokens == pytest.approx(row.input_tokens + row.output_tokens)
        for key in ("accuracy", "ci_low", "ci_high", "input_tokens", "output_tokens", "tokens", "steps",
                    "round_trips", "requests", "scoring_calls"):
            assert raw[key] == getattr(row, key)
        if row.algorithm == "beam-search":
            figures = [r["search"] for r in mine]
            assert row.steps == pytest.approx(sum(f["steps"] for f in figures) / 5)
            assert row.scoring_calls == pytest.approx(sum(f["scoring_calls"] for f in figures) / 5)
            # the toy scorer is one call per round of scoring: a round trip per step and per scoring
            assert all(f["round_trips"] == f["steps"] + f["scoring_calls"] for f in figures)
            assert row.round_trips == pytest.approx(row.steps + row.scoring_calls)
        else:
            assert row.steps is row.round_trips is row.requests is row.scoring_calls is None
            assert all(r["search"] is None for r in mine)
    assert summary["config"]["process_scorer"] == "toy" and summary["config"]["search"]["beam_width"] == 2
    console = Console(record=True, width=250)
    _table(outcome.rows, summary, console)
    text = console.export_text()
    assert "steps / trips / scoring" in text and "beam-search (toy)" in text


# -- resuming a cut-off run ----------------------------------------------------------------------


class PowerCut(Exception):
    """Not a backend failure: it ends the run, as a kill would."""


class CutOff(ScriptedBackend):
    """The writer, until its ``cut``-th request, which ends the process (a power cut)."""

    def __init__(self, cut: int) -> None:
        super().__init__(writer)
        self.cut = cut

    async def generate(self, prompt, params, *, deadline=None):
        if len(self.calls) + 1 >= self.cut:
            raise PowerCut
        return await super().generate(prompt, params, deadline=deadline)


@pytest.mark.parametrize("cut", [3, 17, 40, 54])  # of 54 requests
async def test_a_cut_off_run_resumes_to_the_rows_of_an_uncut_run(tmp_path, cut):
    qs = problems(6)
    uncut_backend = ScriptedBackend(writer)
    uncut = await run_bench(BenchSpec(qs, grid(), "toy", tmp_path / "uncut"), uncut_backend)
    run = tmp_path / "cut"
    with pytest.raises(PowerCut):
        await run_bench(BenchSpec(qs, grid(), "toy", run), CutOff(cut))
    journaled = (run / JOURNAL_FILE).read_text().splitlines()[1:]
    assert len(journaled) < 3 * 2 * 6
    (run / JOURNAL_FILE).write_text((run / JOURNAL_FILE).read_text() + '{"system": "apportion", "algo')  # mid-line
    again = ScriptedBackend(writer)
    resumed = await run_bench(BenchSpec(qs, grid(), "toy", run, resume=True), again)
    assert [comparable(r) for r in resumed.rows] == [comparable(r) for r in uncut.rows]
    assert results(run) == results(tmp_path / "uncut")
    # what was journaled is not asked again (a cut before the first question finished saves nothing)
    assert len(again.calls) < len(uncut_backend.calls) if journaled else len(again.calls) == len(uncut_backend.calls)
    cells = [json.loads(line) for line in (run / JOURNAL_FILE).read_text().splitlines()[1:]]
    keys = [(c["algorithm"], c["budget"], c["problem"]["id"]) for c in cells]
    assert len(keys) == len(set(keys)) == 3 * 2 * 6
    # resuming a finished run asks nothing
    idle = ScriptedBackend(writer)
    await run_bench(BenchSpec(qs, grid(), "toy", run, resume=True), idle)
    assert idle.calls == []


async def test_journal_only_reports_what_a_cut_off_run_finished_and_runs_nothing(tmp_path):
    qs = problems(6)
    run = tmp_path / "cut"
    with pytest.raises(PowerCut):
        await run_bench(BenchSpec(qs, grid(), "toy", run), CutOff(17))
    journaled = [json.loads(line) for line in (run / JOURNAL_FILE).read_text().splitlines()[1:]]
    by_cell: dict[tuple[str, int], list[dict]] = {}
    for c in journaled:
        by_cell.setdefault((c["algorithm"], c["budget"]), []).append(c)
    assert by_cell and len(journaled) < 3 * 2 * 6
    idle = ScriptedBackend(writer)
    outcome = await run_bench(BenchSpec(qs, grid(), "toy", run, journal_only=True), idle)
    assert idle.calls == []
    assert {(r.algorithm, r.budget): r.questions for r in outcome.rows} == {k: len(v) for k, v in by_cell.items()}
    for row in outcome.rows:
        cell = by_cell[(row.algorithm, row.budget)]
        assert row.accuracy == pytest.approx(sum(c["right"] for c in cell) / len(cell))
        assert any(f"cut short: {len(cell)} of 6" in n for n in row.notes) == (len(cell) < 6)
    skipped = outcome.summary["skipped"]
    assert len(skipped) == 3 * 2 - len(by_cell) and all("no question journaled" in s for s in skipped)
    assert (run / JOURNAL_FILE).read_text().count("\n") == len(journaled) + 1  # nothing added
    with pytest.raises(ConfigError, match="runs nothing"):
        await run_bench(BenchSpec(qs, grid(live=False), "toy", run, journal_only=True), idle)


async def test_a_journal_is_only_resumed_by_the_same_configuration(tmp_path):
    await run_bench(BenchSpec(problems(2), grid(), "toy", tmp_path), ScriptedBackend(writer))
    written = results(tmp_path)
    with pytest.raises(ConfigError, match="seed"):
        await run_bench(BenchSpec(problems(2), grid(seed=5), "toy", tmp_path, resume=True), ScriptedBackend(writer))
    with pytest.raises(ConfigError, match="search"):
        await run_bench(BenchSpec(problems(2), grid(search=SearchOptions(beam_width=4)), "toy", tmp_path,
                                  resume=True), ScriptedBackend(writer))
    other = [replace(p, question=p.question + " Quickly.") for p in problems(2)]
    with pytest.raises(ConfigError, match="question 0"):
        await run_bench(BenchSpec(other, grid(), "toy", tmp_path, resume=True), ScriptedBackend(writer))
    with pytest.raises(ConfigError, match="already holds a run"):
        await run_bench(BenchSpec(problems(2), grid(), "toy", tmp_path), ScriptedBackend(writer))
    assert results(tmp_path) == written  # a refused resume rewrites nothing


# -- Game of 24 ----------------------------------------------------------------------------------


def test_game24_puzzles_load_with_their_numbers_first():
    puzzles = load_dataset("game24", data=DATA, limit=2, offset=900)
    assert [p.id for p in puzzles] == ["901", "902"]
    assert all(game24_numbers(p.question) == [int(x) for x in p.answer.split()] for p in puzzles)
    assert judge_for("game24") == "game24" and judge_for("gsm8k") == "gold"
    assert system_prompt_for("game24") == GAME24_SYSTEM_PROMPT and system_prompt_for("gsm8k") is None
    with pytest.raises(ConfigError, match="fixed fields"):
        load_dataset("game24", data=DATA, question_field="q")


@pytest.mark.parametrize(("response", "right", "judged"), [
    ("4 * 6 = 24\n\nThe answer is 4 * 6 * 1 * 1", True, "4 * 6 * 1 * 1"),
    ("The answer is (6 * 4) / (1 * 1) = 24.", True, "(6 * 4) / (1 * 1) = 24"),
    ("The answer is 24", False, "24"),  # a number, not an expression: nothing checked
    ("The answer is 4 * 6", False, "4 * 6"),  # the ones unused
    ("The answer is (1 + 1) * 4 * 6", False, "(1 + 1) * 4 * 6"),  # 48
    ("I give up.", False, None),
])
def test_game24_answers_are_judged_by_the_verifier_not_by_a_gold_answer(response, right, judged):
    [puzzle] = load_dataset("game24", data=DATA, limit=1)  # rank 1: 1 1 4 6
    assert Game24Judge().judge(puzzle, None, response) == (right, judged)
    # the gold judge would compare with the numbers, never matching an expression
    assert GoldJudge().judge(puzzle, "24", response)[0] is False


def solver(prompt, params, call, index):
    """Game of 24 for puzzles "a b c d": a search multiplies a and b, then writes the whole product
    (a solution where the numbers multiply to 24) from every second sample and a bare 24 from the
    others; any other algorithm answers either, at random."""
    a, b, c, d = game24_numbers([m.content for m in prompt.messages if m.role == "user"][-1])
    right = f"The answer is {a} * {b} * {c} * {d}"
    if params.stop:  # a step
        if not prompt.assistant_prefix:
            return f"{a} * {b} = {a * b}"
        return right if index % 2 else "The answer is 24"
    return right if random.Random(f"{params.seed}-{index}").random() < 0.5 else "The answer is 24"


async def test_game24_runs_live_end_to_end_judged_by_the_verifier(tmp_path):
    # puzzles whose four numbers multiply to 24, so the solver's product is a solution
    puzzles = [Problem(str(i), f"Use the numbers {n}, each exactly once, with + - * / and brackets to make 24.", n)
               for i, n in enumerate(["1 1 4 6", "1 2 3 4", "1 1 3 8"])]
    options = GridOptions(("beam-search", "self-consistency"), (2,), SamplingOptions(max_tokens=64,
                          system_prompt=GAME24_SYSTEM_PROMPT), judge="game24", search=SearchOptions(beam_width=2),
                          process_scorer=lambda: CallableVerifier(game24_verifier, name="game24"))
    assert not options.replayed("self-consistency")  # a bank's samples carry no verdicts: run live
    backend = ScriptedBackend(solver)
    outcome = await run_bench(BenchSpec(puzzles, options, "game24", tmp_path), backend)
    assert {c.prompt.messages[0].content for c in backend.calls} == {GAME24_SYSTEM_PROMPT}
    for line in results(tmp_path):
        numbers = [int(x) for x in line["gold"].split()]
        expected = line["answer"] is not None and line["answer"].replace(" ", "") == "*".join(map(str, numbers))
        assert line["right"] == float(expected), line
    beam = next(r for r in outcome.rows if r.algorithm == "beam-search")
    # the verifier rates the product 1 and has nothing to say of a bare 24: the search answers with the product
    assert beam.scorer == "game24" and beam.accuracy == 1.0


# -- its-hub's searches --------------------------------------------------------------------------


async def test_its_hub_sees_our_process_scorer_through_its_interface():
    adapter = its_hub.ProcessRewardAdapter(lambda: CallableVerifier(rate, name="toy"), ScriptedBackend(writer),
                                           delimiter="\n\n", aggregation="min")
    scores = await adapter.ascore("Q", ["Add them.", "Add them.\n\nGuess.", "Guess.\n\nThe answer is 3.", ""])
    # min over steps, as our searches aggregate; a path with an unscored step (the answer step: None)
    # has no score, and neither has an empty one: both are 0.5 to its-hub
    assert scores == [0.9, 0.2, 0.5, 0.5]
    assert await adapter.ascore("Q", "Add them.\n\n\n\nGuess.") == 0.2  # an empty step adds nothing
    state = adapter.questions["Q"]
    assert (state.rounds, state.scoring_rounds) == (2, 1)  # the second round's prefixes were cached
    assert its_hub.rewrite_body({"a": 1, "continue_final_message": True,
                                 "extra_body": {"continue_final_message": True, "include_stop_str_in_output": False}}
                                ) == {"a": 1, "continue_final_message": True, "include_stop_str_in_output": False}
    clash = {"continue_final_message": False, "extra_body": {"continue_final_message": True}}
    assert its_hub.rewrite_body(clash) == clash
    search = PeerSearch(lambda: CallableVerifier(rate), SearchOptions(beam_width=4))
    assert its_hub.refuses("beam-search", 6, search) is not None and its_hub.refuses("beam-search", 8, search) is None
    assert its_hub.refuses("particle-filtering", 3, search) is None


@pytest.mark.skipif(its_hub.available() is not None, reason="its-hub is a dev extra")
async def test_its_hub_beam_search_and_particle_filtering_run_on_the_same_endpoint_and_resume(tmp_path):
    model = ScriptedBackend(writer)
    qs = problems(3)
    options = grid(algorithms=("beam-search",), budgets=(2, 4))
    peers = {"peers": ("its_hub",), "peer_algorithms": ("beam-search", "particle-filtering")}
    with ServedApp(openai_app(model)) as served:
        backend = OpenAIHTTPBackend(HTTPOptions(base_url=served.base_url, model="scripted"))
        outcome = await run_bench(BenchSpec(qs, options, "toy", tmp_path, **peers), backend)
        assert outcome.summary["peer_failures"] == []
        theirs = [r for r in outcome.rows if r.system == "its_hub"]
        assert [(r.algorithm, r.budget) for r in theirs] == [("beam-search", 2), ("beam-search", 4),
                                                             ("particle-filtering", 2), ("particle-filtering", 4)]
        for row in theirs:
            assert row.scorer == "toy" and row.errors == 0 and row.accuracy > 0
            # its paths ended at "The answer is" after two steps, each step scored once
            assert row.steps == 2 and row.round_trips == 4 and row.scoring_calls == 2
            # one request of n=1 per path and step: more requests than ours at the same budget
            ours = next(r for r in outcome.rows if r.system == "apportion" and r.budget == row.budget)
            assert row.requests is not None and ours.requests is not None and row.requests > ours.requests
        calls = len(model.calls)
        await run_bench(BenchSpec(qs, options, "toy", tmp_path, resume=True, **peers), backend)
        assert len(model.calls) == calls  # every cell, ours and its-hub's, came from the journal
        await backend.aclose()


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--algorithms", "self-consistency", "--process-scorer", "game24"], "no algorithm here is one"),
    (["--algorithms", "beam-search"], "needs a process scorer"),
    (["--algorithms", "beam-search", "--process-scorer", "oracle"], "unknown process scorer"),
    (["--algorithms", "self-consistency", "--beam-width", "2"], "no algorithm here is one"),
])
def test_the_command_line_refuses_search_settings_that_cannot_apply(tmp_path, args, message):
    result = CliRunner().invoke(app, ["bench", "--dataset", "game24", "--data-dir", str(DATA), "--limit", "1",
                                      "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_continuation_is_a_server_setting():
    served = OpenAIHTTPBackend(HTTPOptions(base_url="http://127.0.0.1:9/v1", model="m"))
    assert _continued(served, "chatml").options.continuation == "chatml"  # type: ignore[attr-defined]
    assert _continued(served, None) is served
    with pytest.raises(ConfigError, match="embedded"):
        _continued(ScriptedBackend(writer), "chatml")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one of"):
        _continued(served, "telepathy")


async def test_a_sampling_field_added_later_leaves_the_journal_header_alone_at_its_default(tmp_path):
    """Journals written before ``SamplingOptions.answers`` existed resume: at its default the field
    is not in the header; set otherwise, it is, so those cells never mix with math-mode ones."""

    async def header(sampling: SamplingOptions, out: Path) -> dict:
        opts = grid(algorithms=("self-consistency",), budgets=(1,), sampling=sampling)
        await run_bench(BenchSpec(problems(1), opts, "toy", out), ScriptedBackend(writer))
        return json.loads((out / JOURNAL_FILE).read_text().splitlines()[0])["sampling"]

    assert "answers" not in await header(SamplingOptions(max_tokens=64), tmp_path / "math")
    assert (await header(SamplingOptions(max_tokens=64, answers="text"), tmp_path / "text"))["answers"] == "text"


@pytest.mark.parametrize("written, resumes", [("math", True), ("text", False)])
async def test_a_journal_that_wrote_a_later_field_at_its_default_resumes(tmp_path, written, resumes):
    """Some journals were written while the header still carried ``answers`` at its default."""
    qs = problems(2)
    opts = grid(algorithms=("self-consistency",), budgets=(2,))
    await run_bench(BenchSpec(qs, opts, "toy", tmp_path), ScriptedBackend(writer))
    lines = (tmp_path / JOURNAL_FILE).read_text().splitlines()
    head = json.loads(lines[0])
    head["sampling"]["answers"] = written
    (tmp_path / JOURNAL_FILE).write_text("\n".join([json.dumps(head), *lines[1:]]) + "\n")
    again = ScriptedBackend(writer)
    if resumes:
        await run_bench(BenchSpec(qs, opts, "toy", tmp_path, resume=True), again)
        assert again.calls == []
    else:
        with pytest.raises(ConfigError, match="sampling"):
            await run_bench(BenchSpec(qs, opts, "toy", tmp_path, resume=True), again)
