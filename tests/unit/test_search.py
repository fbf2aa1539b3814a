"""Step-wise search: beam search and DVTS on scripted trees whose right path is known, the requests
each search step makes, finished paths leaving the beam, and the budget held in every unit."""

import asyncio
import zlib
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.beam_search import BeamSearch, BeamSearchOptions
from apportion.algorithms.dvts import DVTS, DVTSOptions
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.steps import STEP_SYSTEM_PROMPT, Path, StepOptions, split
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price, to_fraction
from apportion.errors import BudgetExhausted, ConfigError, ProcessScoringFailed
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import ScriptedBackend
from apportion.reward.process import PrefixScoreCache, ProcessScorer, score_paths
from tests.conftest import examples

QUESTION = "What is 6 * 7?"
D = "\n\n"

# The tree: what the model writes after each prefix, by sample index (cycled). Unknown prefixes
# answer 13. The right path: "Multiply 6 by 7." -> "6 * 7 = 42." -> "The answer is 42."
TREE = {
    "": ["Guess 40.", "Multiply 6 by 7.", "Add 6 and 7.", "Write 6 * 7."],
    "Multiply 6 by 7.": ["6 * 7 = 41.", "6 * 7 = 42."],
    "Write 6 * 7.": ["That is 48.", "That is 13."],
    "Multiply 6 by 7.|6 * 7 = 42.": ["The answer is 42."],
    "Multiply 6 by 7.|6 * 7 = 41.": ["The answer is 41."],
    "Write 6 * 7.|That is 48.": ["The answer is 48."],
}
# The process scorer's view: the score of a prefix is its newest step's.
SCORES = {"Guess 40.": 0.1, "Multiply 6 by 7.": 0.9, "Add 6 and 7.": 0.2, "Write 6 * 7.": 0.6,
          "6 * 7 = 41.": 0.3, "6 * 7 = 42.": 0.95, "That is 48.": 0.4, "That is 13.": 0.1,
          "The answer is 42.": 0.99, "The answer is 41.": 0.3, "The answer is 48.": 0.4, "The answer is 13.": 0.2}


def _steps_of(prefix: str) -> list[str]:
    return [s for s in prefix.split(D) if s]


def tree_backend(tree=TREE, **kwargs) -> ScriptedBackend:
    def reply(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str:
        options = tree.get("|".join(_steps_of(prompt.assistant_prefix)), ["The answer is 13."])
        step = options[i % len(options)]
        return step if "answer is" in step else step + D + "and so on"

    return ScriptedBackend(reply, **kwargs)


class TableScorer:
    """A process scorer (``reward.process.ProcessScorer``) reading each prefix's score from a
    table by its newest step, through the shared cache. With ``backend``, each scoring round is
    one scorer request charged to the ledger (one token out)."""

    name = "table"

    def __init__(self, table=SCORES, *, backend: ScriptedBackend | None = None, default: float = 0.5,
                 fail_after: int | None = None) -> None:
        self.table, self.backend, self.default, self.fail_after = table, backend, default, fail_after
        self.cache = PrefixScoreCache()
        self.rounds: list[list[tuple[str, ...]]] = []

    def rate(self, prefix: tuple[str, ...]) -> float:
        return self.table.get(prefix[-1], self.default)

    async def score(self, lm: MeteredLM, question: str, paths):
        async def new(prefixes):
            self.rounds.append(prefixes)
            if self.fail_after is not None and len(self.rounds) > self.fail_after:
                raise ProcessScoringFailed("judge down", [[None] * len(p) for p in paths])
            if self.backend is not None:
                words = " ".join(" ".join(p) for p in prefixes)
                try:
                    await lm.scorer(self.backend).generate(Prompt.raw(words), SamplingParams(max_tokens=1))
                except BudgetExhausted as exc:
                    return dict.fromkeys(prefixes, exc)
            return {p: self.rate(p) for p in prefixes}

        return await score_paths(self.cache, question, paths, new, scorer=self.name)


def by_depth(backend: ScriptedBackend) -> dict[int, list[int]]:
    """The n of every step request, by the number of steps it continued."""
    out: dict[int, list[int]] = {}
    for call in backend.calls:
        out.setdefault(len(_steps_of(call.prompt.assistant_prefix)), []).append(call.params.n)
    return out


def run(algorithm, backend, budget, **kwargs):
    return asyncio.run(algorithm.run(backend, QUESTION, budget, seed=1, **kwargs))


SAMPLING = make_algorithm("sc").options.sampling


def test_the_scorer_in_these_tests_is_a_process_scorer():
    assert isinstance(TableScorer(), ProcessScorer)


# -- beam search ----------------------------------------------------------------------------------


def test_beam_search_finds_the_known_path_in_one_round_of_requests_per_step():
    lm, judge = tree_backend(), ScriptedBackend(["1"])
    scorer = TableScorer(backend=judge)
    result = run(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=scorer), lm, Budget(generations=4))

    assert result.answer == "42"
    chosen = result.candidates[result.search.chosen]
    assert chosen.steps == ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")
    assert chosen.step_scores == (0.9, 0.95, 0.99)
    assert chosen.score == 0.99 and chosen.finish_reason == "stop"
    assert result.response == "Multiply 6 by 7." + D + "6 * 7 = 42." + D + "The answer is 42."
    # step 1: one request of n=4 from the empty prefix; then the top 2 of 4, one request of n=2 each
    assert by_depth(lm) == {0: [4], 1: [2, 2], 2: [2, 2]}
    assert [c.prompt.assistant_prefix for c in lm.calls[1:3]] == ["Multiply 6 by 7." + D, "Write 6 * 7." + D]
    assert all(c.params.stop == (D,) and c.params.max_tokens == StepOptions().max_step_tokens for c in lm.calls)
    # exactly N paths finished, each one generation; steps are continuations
    assert result.spent.generations == len(result.candidates) == 4
    assert result.spent.continuations == 4 + 4 + 4
    assert result.exhausted and "generations" in result.exhausted_reason
    # round trips: a round of step requests and one of scoring per step
    s = result.search
    assert (s.steps, s.requests, s.scoring_calls, s.round_trips) == (3, 5, 3, 6) and s.width == 4
    assert s.requests == len(lm.calls) and s.scoring_calls == len(judge.calls)
    # cached prefixes are never scored twice: each scoring call had only the new step of each path
    assert [len(r) for r in scorer.rounds] == [4, 4, 2]


def test_beam_search_with_the_step_judge_through_the_policy_backend():
    from apportion.lm.scripted import Reply
    from apportion.reward.process_judge import DEFAULT_STEP_SYSTEM, JudgeProcessScorer

    good = ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")
    policy = tree_backend()

    def reply(prompt, params, call, i):
        if prompt.messages and prompt.messages[0].content == DEFAULT_STEP_SYSTEM:  # the judge's prompt
            step = prompt.messages[-1].content.split("New step:\n", 1)[1].split("\n", 1)[0]
            return Reply("Yes" if any(g in step for g in good) else "No", logprob=-0.05)
        return policy._reply(prompt, params, call, i)

    lm = ScriptedBackend(reply)
    result = run(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=JudgeProcessScorer()), lm,
                 Budget(generations=4, total_tokens=5000))
    assert result.answer == "42"
    assert result.candidates[result.search.chosen].steps == good
    s = result.search
    assert s.scoring_calls == result.spent.scorer_generations > 0  # one judge request per new prefix
    # the best path and the first of the tied others are kept; the latter ends at once (answer 13)
    assert s.round_trips == s.steps + 3 and s.requests == 1 + 2 + 1 and s.scoring_calls == 4 + 3 + 1
    assert result.spent.generations == len(result.candidates) == 4


def test_finished_paths_leave_the_beam_and_the_beam_narrows():
    tree = {**TREE, "": ["The answer is 5.", "Multiply 6 by 7.", "Add 6 and 7.", "Write 6 * 7."]}
    lm = tree_backend(tree)
    result = run(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=TableScorer()), lm,
                 Budget(generations=4))

    # one root child finished at once: 3 live, 3 children asked of the best 2 (2 + 1), ...
    assert by_depth(lm)[0] == [4] and by_depth(lm)[1] == [2, 1]
    finished = [c.steps for c in result.candidates]
    assert ("The answer is 5.",) in finished  # kept as a candidate, never expanded again
    assert all(not c.prompt.assistant_prefix.startswith("The answer is 5.") for c in lm.calls)
    assert result.answer == "42"
    assert result.spent.generations == len(result.candidates) == 4


def test_beam_search_with_a_token_budget_uses_width_and_ends_live_paths_as_budget_candidates():
    lm = tree_backend()
    budget = Budget(output_tokens=40)
    options = BeamSearchOptions(beam_width=2, width=4, steps=StepOptions(max_step_tokens=8))
    result = run(BeamSearch(options, process_scorer=TableScorer()), lm, budget)

    assert by_depth(lm)[0] == [4]
    assert result.exhausted
    assert result.spent.output_tokens <= 40
    assert result.spent.generations == len(result.candidates) <= 4
    assert any(c.finish_reason == "length" for c in result.candidates)  # live paths the budget cut short


def test_weighted_vote_sums_scores_per_answer():
    # two weak paths agree on 41, one strong path says 42: the best path says 42, the vote 41
    tree = {"": ["A.", "B.", "C."], "A.": ["The answer is 41."], "B.": ["The answer is 41."],
            "C.": ["The answer is 42."]}
    table = {"A.": 0.5, "B.": 0.5, "C.": 0.5, "The answer is 41.": 0.6, "The answer is 42.": 0.9}
    best = run(BeamSearch(BeamSearchOptions(beam_width=1), process_scorer=TableScorer(table)), tree_backend(tree),
               Budget(generations=3))
    vote = run(BeamSearch(BeamSearchOptions(beam_width=1, vote=True), process_scorer=TableScorer(table)),
               tree_backend(tree), Budget(generations=3))
    assert best.answer == "42"
    assert vote.answer == "41" and vote.distribution == pytest.approx({"41": 1.2, "42": 0.9})


def test_aggregation_decides_which_paths_are_kept_and_chosen():
    # by the newest step B looks best; by its weakest step B is worst
    live = [Path(("A.", "A2."), (0.6, 0.6)), Path(("B.", "B2."), (0.1, 0.9))]
    for how, kept in (("last", "B."), ("min", "A."), ("mean", "A."), ("product", "A.")):
        wants, pruned = BeamSearch(BeamSearchOptions(beam_width=2, aggregation=how))._kept(live, 2)
        assert [(p.steps[0], k) for p, k in wants] == [(kept, 2)] and pruned == 1
    tree = {"": ["A.", "B."], "A.": ["A2."], "B.": ["B2."], "A.|A2.": ["The answer is 1."],
            "B.|B2.": ["The answer is 2."]}
    table = {"A.": 0.6, "B.": 0.1, "A2.": 0.6, "B2.": 0.9, "The answer is 1.": 0.6, "The answer is 2.": 0.9}
    for how, answer in (("last", "2"), ("min", "1")):
        result = run(BeamSearch(BeamSearchOptions(beam_width=1, aggregation=how), process_scorer=TableScorer(table)),
                     tree_backend(tree), Budget(generations=2))
        assert result.answer == answer


def test_max_steps_ends_a_path():
    lm = tree_backend({"": ["Think."], "Think.": ["More."], "Think.|More.": ["Still."]})
    result = run(BeamSearch(BeamSearchOptions(beam_width=1, steps=StepOptions(max_steps=2)),
                            process_scorer=TableScorer()), lm, Budget(generations=1))
    [path] = result.candidates
    assert path.steps == ("Think.", "More.") and path.finish_reason == "length" and path.answer is None
    assert result.search.steps == 2


def test_an_empty_step_is_the_end_of_the_reply():
    def reply(prompt, params, call, i):
        return "" if prompt.assistant_prefix else "Seven." + D

    lm = ScriptedBackend(reply)
    result = run(BeamSearch(BeamSearchOptions(beam_width=1), process_scorer=TableScorer()), lm, Budget(generations=1))
    [path] = result.candidates
    assert path.steps == ("Seven.",) and path.finish_reason == "stop"


def test_every_k_tokens_cuts_steps_by_length():
    lm = ScriptedBackend(["one two three four five six seven"])
    options = BeamSearchOptions(beam_width=2, steps=StepOptions(every_tokens=3, max_steps=3))
    result = run(BeamSearch(options, process_scorer=TableScorer()), lm, Budget(generations=2))
    assert all(c.params.max_tokens == 3 and c.params.stop == () for c in lm.calls)
    assert all(len(c.steps) == 3 and c.output_tokens == 9 for c in result.candidates)
    # a step that ends before its k tokens is the end of the reply
    lm = ScriptedBackend(["one two"])
    result = run(BeamSearch(options, process_scorer=TableScorer()), lm, Budget(generations=2))
    assert [c.steps for c in result.candidates] == [("one two",), ("one two",)]


def test_a_failing_scorer_ends_the_run_and_keeps_the_paths():
    result = run(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=TableScorer(fail_after=1)),
                 tree_backend(), Budget(generations=4))
    assert result.error is not None and "judge down" in result.error
    assert result.spent.generations == len(result.candidates) == 4
    assert {c.finish_reason for c in result.candidates} == {"length"}


def test_a_search_needs_a_process_scorer_and_continuation():
    with pytest.raises(ConfigError, match="process scorer"):
        run(BeamSearch(), tree_backend(), Budget(generations=2))

    class NoContinuation(ScriptedBackend):
        @property
        def capabilities(self):
            return replace(super().capabilities, continuation=False)

    with pytest.raises(ConfigError, match="cannot do"):
        run(DVTS(process_scorer=TableScorer()), NoContinuation(["x"]), Budget(generations=2))


def test_the_deadline_ends_the_search_with_its_live_paths():
    lm = ScriptedBackend(lambda prompt, params, call, i: "Think more." + D, latency_s=0.05)
    options = BeamSearchOptions(beam_width=2, width=2, steps=StepOptions(max_steps=1000))
    result = run(BeamSearch(options, process_scorer=TableScorer()), lm, Budget(seconds=0.3))
    assert result.exhausted and result.spent.seconds < 1.5
    assert 1 <= len(result.candidates) <= 2 and result.spent.generations == len(result.candidates)
    assert all(c.finish_reason in ("length", "deadline") and len(c.steps) >= 1 for c in result.candidates)


# -- DVTS -----------------------------------------------------------------------------------------


def test_dvts_expands_each_subtree_greedily_and_finds_the_known_path():
    lm = tree_backend()
    result = run(DVTS(DVTSOptions(beam_width=2), process_scorer=TableScorer()), lm, Budget(generations=4))

    assert result.answer == "42"
    chosen = result.candidates[result.search.chosen]
    assert chosen.steps == ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")
    # 2 subtrees of 2: step 1 is one request of n=4 (the subtrees share the empty prefix);
    # subtree 1 (Guess, Add) keeps Add, subtree 2 (Multiply, Write) keeps Multiply
    assert by_depth(lm)[0] == [4]
    assert sorted(c.prompt.assistant_prefix for c in lm.calls if c.prompt.assistant_prefix.count(D) == 1) == \
        ["Add 6 and 7." + D, "Multiply 6 by 7." + D]
    # subtree 1 ends at step 2 (both its children answered 13, kept as candidates); subtree 2 goes on alone
    assert by_depth(lm) == {0: [4], 1: [2, 2], 2: [2]}
    assert result.spent.generations == len(result.candidates) == 4
    assert result.search.steps == 3 and result.search.requests == 4


def test_dvts_subtrees_with_the_same_path_share_one_request():
    tree = {"": ["Same."], "Same.": ["The answer is 1.", "The answer is 2."]}
    lm = tree_backend(tree)
    result = run(DVTS(DVTSOptions(beam_width=2), process_scorer=TableScorer()), lm, Budget(generations=4))
    assert by_depth(lm) == {0: [4], 1: [4]}  # two subtrees kept "Same.": one request of n=4
    assert result.spent.generations == len(result.candidates) == 4


def test_dvts_early_finishers_use_generations_and_later_steps_ask_for_fewer():
    # the first step: three of four children finish; each subtree's later steps get what is left
    tree = {"": ["The answer is 1.", "Go.", "The answer is 2.", "The answer is 3."]}
    lm = tree_backend(tree)
    result = run(DVTS(DVTSOptions(beam_width=2), process_scorer=TableScorer({"Go.": 0.9})), lm,
                 Budget(generations=4))
    # subtree 1 had (answer 1, answer 2): it ended; subtree 2 had (Go., answer 3): it keeps Go.
    # with one generation left beside its own, it asks for 1 child, not 2
    assert by_depth(lm) == {0: [4], 1: [1]}
    assert result.spent.generations == len(result.candidates) == 4


# -- shared pieces ---------------------------------------------------------------------------------


def test_split_and_options():
    assert split(8, 2) == [4, 4] and split(7, 2) == [4, 3] and split(3, 1) == [3]
    with pytest.raises(ConfigError):
        BeamSearchOptions(aggregation="median")
    with pytest.raises(ConfigError):
        DVTSOptions(beam_width=0)
    with pytest.raises(ConfigError):
        StepOptions(delimiter="")
    with pytest.raises(ConfigError):
        StepOptions(final_answer=("last_number", "magic"))
    assert StepOptions().has_final_answer("so \\boxed{4}") and not StepOptions().has_final_answer("it is 4")


def test_registry_builds_searches_with_their_components():
    scorer = TableScorer()
    beam = make_algorithm("beam-search", SAMPLING, process_scorer=scorer,
                          search=DVTSOptions(beam_width=3, aggregation="min"))
    assert isinstance(beam, BeamSearch) and beam.options.beam_width == 3 and beam.options.aggregation == "min"
    assert beam.options.sampling == replace(SAMPLING, system_prompt=STEP_SYSTEM_PROMPT)
    assert beam.process_scorer is scorer
    mine = replace(SAMPLING, system_prompt="Mine.")
    assert make_algorithm("dvts", mine).options.sampling == mine
    assert BeamSearchOptions().sampling.system_prompt == STEP_SYSTEM_PROMPT
    assert make_algorithm("dvts").name == "dvts" and make_algorithm("beam").name == "beam-search"
    with pytest.raises(ConfigError, match="process scorer"):
        make_algorithm("sc", process_scorer=scorer)
    with pytest.raises(ConfigError, match="stopping"):
        from apportion.algorithms.stopping import parse_stop
        make_algorithm("dvts", stopping=parse_stop("esc"))
    assert make_algorithm("dvts", process_scorer=scorer).options_dict()["process_scorer"] == "table"


def test_the_result_serialises_steps_scores_and_the_search():
    result = run(BeamSearch(BeamSearchOptions(beam_width=2), process_scorer=TableScorer()), tree_backend(),
                 Budget(generations=4))
    out = result.to_dict()
    assert out["search"]["chosen"] == result.search.chosen and out["search"]["round_trips"] >= 3
    chosen = out["candidates"][result.search.chosen]
    assert chosen["steps"] == ["Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42."]
    assert chosen["step_scores"] == [0.9, 0.95, 0.99]
    plain = run(make_algorithm("sc"), ScriptedBackend(["The answer is 4"]), Budget(generations=1)).to_dict()
    assert "search" not in plain and "steps" not in plain["candidates"][0]


def test_prior_candidates_take_part_in_the_choice():
    first = run(DVTS(DVTSOptions(beam_width=2), process_scorer=TableScorer()), tree_backend(), Budget(generations=4))
    again = run(BeamSearch(BeamSearchOptions(beam_width=1), process_scorer=TableScorer()),
                ScriptedBackend(["The answer is 7."]), Budget(generations=1), prior=first.candidates)
    assert len(again.candidates) == len(first.candidates) + 1 and again.answer == "42"


def test_the_command_line_runs_a_search_over_http(monkeypatch):
    import json

    from typer.testing import CliRunner

    import apportion.cli._app
    from apportion.cli import app
    from tests.support.fake_openai import FakeOpenAI

    steps = ["Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42."]

    def reply(body, index):
        messages = body.get("messages", [])
        done = _steps_of(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else []
        return steps[len(done)]

    monkeypatch.setitem(apportion.cli._app.PROCESS_SCORERS, "table", TableScorer)
    with FakeOpenAI(reply) as server:
        result = CliRunner().invoke(app, [
            "run", QUESTION, "--algorithm", "beam-search", "--process-scorer", "table", "--beam-width", "2",
            "--budget", "gen=2,tokens=3000", "--base-url", server.base_url, "--model", server.model, "--json"])
        bodies = server.billing.bodies
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "42" and out["algorithm"] == "beam-search"
    assert out["candidates"][out["search"]["chosen"]]["steps"] == steps
    assert out["search"]["steps"] == 3 and out["spent"]["generations"] == 2
    assert [b.get("n", 1) for b in bodies] == [2, 2, 2]
    assert bodies[0]["stop"] == [D] and bodies[1]["messages"][-1]["content"] == steps[0] + D
    assert out["options"]["process_scorer"] == "table" and "blank line" in bodies[0]["messages"][0]["content"]


def test_the_command_line_refuses_a_search_without_a_process_scorer():
    from typer.testing import CliRunner

    from apportion.cli import app

    missing = CliRunner().invoke(app, ["run", QUESTION, "--algorithm", "dvts", "--base-url", "http://127.0.0.1:9/v1",
                                       "--model", "m"])
    assert missing.exit_code == 2 and "needs --process-scorer" in missing.output
    unknown = CliRunner().invoke(app, ["run", QUESTION, "--algorithm", "dvts", "--process-scorer", "nonesuch",
                                       "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert unknown.exit_code == 2 and "unknown process scorer 'nonesuch'" in unknown.output
    prm = CliRunner().invoke(app, ["run", QUESTION, "--algorithm", "dvts", "--process-scorer", "prm",
                                   "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert prm.exit_code == 2 and "prm needs base_url and model" in prm.output
    typo = CliRunner().invoke(app, ["run", QUESTION, "--algorithm", "dvts", "--process-scorer",
                                    "prm:base_url=http://127.0.0.1:9,model=m,retries=2",
                                    "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert typo.exit_code == 2 and "'retries=2' is not KEY=VALUE" in typo.output


def test_the_command_line_searches_with_a_process_reward_model_server():
    """``--process-scorer prm:...`` end to end: the PRM server rates the steps (a wrong step low),
    the search follows its scores, and its prompt tokens are charged as scoring."""
    import json

    from typer.testing import CliRunner

    from apportion.cli import app
    from tests.support.fake_openai import FakeOpenAI
    from tests.support.fake_prm import FakePRM

    def reply(body, index):
        messages = body.get("messages", [])
        done = _steps_of(messages[-1]["content"]) if messages[-1]["role"] == "assistant" else []
        if not done:
            return ["A wrong start.", "Multiply 6 by 7."][index % 2]
        return "The answer is 13." if "wrong" in done[0] else "The answer is 42."

    with FakeOpenAI(reply) as server, FakePRM() as prm:
        result = CliRunner().invoke(app, [
            "run", QUESTION, "--algorithm", "beam-search", "--beam-width", "2", "--budget", "gen=2,tokens=3000",
            "--process-scorer", f"prm:base_url={prm.base_url},model={prm.model},max_concurrency=2",
            "--base-url", server.base_url, "--model", server.model, "--json"])
        scored = prm.billing.ok
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "42" and out["options"]["process_scorer"] == "prm"
    assert scored >= 2 and out["search"]["scoring_calls"] >= 2
    assert out["candidates"][out["search"]["chosen"]]["step_scores"][0] == pytest.approx(0.9)


def test_a_batch_refuses_a_search_it_cannot_give_a_process_scorer(tmp_path):
    from typer.testing import CliRunner

    from apportion.cli import app

    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"question": "What is 6 * 7?"}\n')
    out = CliRunner().invoke(app, ["run", "--file", str(prompts), "--out", str(tmp_path / "a.jsonl"),
                                   "--total-budget", "gen=8", "--algorithm", "beam-search",
                                   "--base-url", "http://127.0.0.1:9/v1", "--model", "m"])
    assert out.exit_code == 2 and "does not take yet" in out.output


def test_the_command_line_process_scorers_are_process_scorers():
    from apportion.cli._app import PROCESS_SCORERS, make_process_scorer

    assert {"judge", "game24"} <= set(PROCESS_SCORERS)
    assert all(isinstance(make_process_scorer(name), ProcessScorer) for name in PROCESS_SCORERS)


# -- the budget ------------------------------------------------------------------------------------

STEP_TEXTS = ["We add 3.", "So 7.", "carry the one", "The answer is 7.", "The answer is 12.", "", "Hmm",
              "long " * 12, "\\boxed{7}", "Then 3 and 4"]


def random_tree(salt: int):
    """A deterministic random tree: each (prefix, sample, seed) picks a step and what follows it."""
    def reply(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str:
        key = f"{salt}|{prompt.assistant_prefix}|{i}|{params.seed}".encode()
        h = zlib.crc32(key)
        step = STEP_TEXTS[h % len(STEP_TEXTS)]
        return step + (D + "more" if h % 3 else "")

    return reply


@st.composite
def budgets(draw):
    limits = {
        "generations": st.integers(1, 10),
        "input_tokens": st.integers(1, 800),
        "output_tokens": st.integers(1, 300),
        "total_tokens": st.integers(1, 1000),
        "usd": st.sampled_from([0.0005, 0.001, 0.003, 0.01]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=4, unique=True))
    return Budget(**{name: draw(limits[name]) for name in chosen})


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=budgets(),
    algorithm=st.sampled_from(["beam-search", "dvts"]),
    salt=st.integers(0, 10_000),
    beam_width=st.integers(1, 4),
    width=st.one_of(st.none(), st.integers(1, 8)),
    native_n=st.booleans(),
    charged_scorer=st.booleans(),
    every_tokens=st.one_of(st.none(), st.integers(1, 4)),
    max_tokens=st.integers(2, 30),
    max_steps=st.integers(1, 5),
)
def test_no_limit_is_ever_exceeded_and_every_candidate_is_one_generation(
        budget, algorithm, salt, beam_width, width, native_n, charged_scorer, every_tokens, max_tokens, max_steps):
    price = Price(1.0, 2.0)
    lm = ScriptedBackend(random_tree(salt), native_n=native_n, price=price)
    judge = ScriptedBackend(["1"], price=price) if charged_scorer else None
    scorer = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS}, backend=judge)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=1)
    search = BeamSearchOptions(steps=StepOptions(every_tokens=every_tokens, max_steps=max_steps, max_step_tokens=6),
                               beam_width=beam_width, width=width)
    ledger = Ledger(budget)
    result = asyncio.run(make_algorithm(algorithm, sampling, process_scorer=scorer, search=search)
                         .run(lm, QUESTION, ledger, seed=3))
    check_search_within_budget(result, ledger, budget, search_width(budget, width), lm, max_steps)


def search_width(budget: Budget, width: int | None) -> int:
    """N as a search takes it: ``width`` (8 if unset) within the budget's generations."""
    gen = budget.generations
    n = width if width is not None else (8 if gen is None else gen)
    return n if gen is None else min(n, gen)


def check_search_within_budget(result, ledger: Ledger, budget: Budget, n: int, lm: ScriptedBackend,
                               max_steps: int) -> None:
    """What every step-wise search's budget property checks of one run: no limit passed, no hold
    left behind, one generation per finished path (at most N), every request and scoring call in
    the trace and the round trips adding up, no request wider than N, no path past max_steps."""
    spent = result.spent
    assert not spent.violations(budget)
    if budget.generations is not None:
        assert spent.generations <= budget.generations
        assert ledger.remaining().generations == budget.generations - spent.generations  # no hold left behind
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)
    assert spent.generations == len(result.candidates) <= n
    assert spent.generations == 0 or all(c.steps is not None for c in result.candidates)
    # every step request is a continuation, every scoring call a scorer call; round trips add up
    s = result.search
    assert s.requests == sum(1 for r in result.trace if r.kind == "continuation")
    assert s.scoring_calls == sum(1 for r in result.trace if r.kind == "scorer")
    assert s.steps <= s.round_trips <= 2 * s.steps
    assert not any(r.kind == "policy" for r in result.trace)
    assert all(c.params.n <= n for c in lm.calls)
    assert all(len(c.steps or ()) <= max_steps for c in result.candidates)
