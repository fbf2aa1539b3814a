"""Tree of Thoughts (BFS): scripted trees whose right path is known, the best ``breadth`` states
kept per level, the requests of each level, self-evaluation with ToT's value prompt through the
policy model, an outside process scorer, and the budget held in every unit."""

import asyncio
import zlib
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.steps import STEP_SYSTEM_PROMPT, SearchOptions, StepOptions
from apportion.algorithms.tree_of_thoughts import (
    DEFAULT_VALUE_SYSTEM,
    VALUE_WEIGHTS,
    ThoughtValueOptions,
    ThoughtValueScorer,
    TreeOfThoughts,
    TreeOfThoughtsOptions,
    read_value,
)
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price, to_fraction
from apportion.errors import BudgetExhausted, ConfigError
from apportion.lm.base import Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import ScriptedBackend
from apportion.reward.process import PrefixScoreCache, ProcessScorer, score_paths
from apportion.reward.verifiers import CallableVerifier, game24_verifier
from tests.conftest import examples

QUESTION = "What is 6 * 7?"
D = "\n\n"

# What the model writes after each prefix, by sample index (cycled); unknown prefixes answer 13.
# The right path: "Multiply 6 by 7." -> "6 * 7 = 42." -> "The answer is 42."
TREE = {
    "": ["Guess 40.", "Multiply 6 by 7.", "Add 6 and 7.", "Write 6 * 7."],
    "Multiply 6 by 7.": ["6 * 7 = 41.", "6 * 7 = 42."],
    "Write 6 * 7.": ["That is 48.", "That is 13."],
    "Add 6 and 7.": ["That is 13."],
    "Multiply 6 by 7.|6 * 7 = 42.": ["The answer is 42."],
    "Multiply 6 by 7.|6 * 7 = 41.": ["The answer is 41."],
    "Write 6 * 7.|That is 48.": ["The answer is 48."],
}
# A state's value is its newest thought's.
VALUES = {"Guess 40.": 0.1, "Multiply 6 by 7.": 0.9, "Add 6 and 7.": 0.2, "Write 6 * 7.": 0.6,
          "6 * 7 = 41.": 0.3, "6 * 7 = 42.": 0.95, "That is 48.": 0.4, "That is 13.": 0.1,
          "The answer is 42.": 0.99, "The answer is 41.": 0.3, "The answer is 48.": 0.4, "The answer is 13.": 0.2}
RIGHT = ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")


def _steps_of(prefix: str) -> list[str]:
    return [s for s in prefix.split(D) if s]


def next_thought(tree, prompt: Prompt, i: int) -> str:
    options = tree.get("|".join(_steps_of(prompt.assistant_prefix)), ["The answer is 13."])
    step = options[i % len(options)]
    return step if "answer is" in step else step + D + "and so on"


def tree_backend(tree=TREE, **kwargs) -> ScriptedBackend:
    return ScriptedBackend(lambda prompt, params, call, i: next_thought(tree, prompt, i), **kwargs)


class TableScorer:
    """A process scorer reading each state's value from a table by its newest thought (through the
    shared cache); with ``backend``, each call is one scorer request charged to the ledger."""

    name = "table"

    def __init__(self, table=VALUES, *, backend: ScriptedBackend | None = None, default: float = 0.5) -> None:
        self.table, self.backend, self.default = table, backend, default
        self.cache = PrefixScoreCache()
        self.rounds: list[list[tuple[str, ...]]] = []

    async def score(self, lm: MeteredLM, question: str, paths):
        async def new(prefixes):
            self.rounds.append(prefixes)
            if self.backend is not None:
                try:
                    await lm.scorer(self.backend).generate(Prompt.raw(" ".join(map(" ".join, prefixes))),
                                                           SamplingParams(max_tokens=1))
                except BudgetExhausted as exc:
                    return dict.fromkeys(prefixes, exc)
            return {p: self.table.get(p[-1], self.default) for p in prefixes}

        return await score_paths(self.cache, question, paths, new, scorer=self.name)


def expanded(backend: ScriptedBackend) -> dict[int, list[tuple[str, int]]]:
    """Every thought request by depth: the state it continued (its newest thought) and its n."""
    out: dict[int, list[tuple[str, int]]] = {}
    for call in backend.calls:
        steps = _steps_of(call.prompt.assistant_prefix)
        out.setdefault(len(steps), []).append((steps[-1] if steps else "", call.params.n))
    return out


def run(algorithm, backend, budget, question=QUESTION, **kwargs):
    return asyncio.run(algorithm.run(backend, question, budget, seed=1, **kwargs))


def tot(**options) -> TreeOfThoughtsOptions:
    return TreeOfThoughtsOptions(**options)


def test_the_value_scorer_is_a_process_scorer():
    assert isinstance(ThoughtValueScorer(), ProcessScorer) and isinstance(TableScorer(), ProcessScorer)


def test_tot_finds_the_known_path_keeping_the_best_states_of_each_level():
    lm = tree_backend()
    scorer = TableScorer()
    result = run(TreeOfThoughts(tot(breadth=2, thoughts=4), process_scorer=scorer), lm, Budget(total_tokens=10_000))

    assert result.answer == "42"
    chosen = result.candidates[result.search.chosen]
    assert chosen.steps == RIGHT and chosen.step_scores == (0.9, 0.95, 0.99)
    # level 1: k=4 thoughts of the question in one request; the best 2 (Multiply 0.9, Write 0.6) go on,
    # each asking for 4 thoughts (one request of n=4 each); level 2 keeps the best 2 distinct states
    # (6 * 7 = 42. 0.95, That is 48. 0.4; the repeated ones once), whose thoughts all answer
    assert expanded(lm) == {0: [("", 4)], 1: [("Multiply 6 by 7.", 4), ("Write 6 * 7.", 4)],
                            2: [("6 * 7 = 42.", 4), ("That is 48.", 4)]}
    assert all(c.params.stop == (D,) for c in lm.calls)
    # every new state of a level valued in one call (cached prefixes never again)
    assert [len(r) for r in scorer.rounds] == [4, 4, 2]
    # every finished state is one generation; thoughts are continuations
    assert result.spent.generations == len(result.candidates) == 8
    assert result.spent.continuations == 4 + 8 + 8
    assert {c.answer for c in result.candidates} == {"42", "48"}
    s = result.search
    assert (s.steps, s.requests) == (3, 5)
    assert s.width == TreeOfThoughtsOptions(breadth=2, thoughts=4).most_paths == 4 + 15 * 8


@pytest.mark.parametrize(("breadth", "kept"), [(1, {"Multiply 6 by 7."}),
                                               (2, {"Multiply 6 by 7.", "Write 6 * 7."}),
                                               (3, {"Multiply 6 by 7.", "Write 6 * 7.", "Add 6 and 7."})])
def test_only_the_best_breadth_states_are_expanded(breadth, kept):
    lm = tree_backend()
    result = run(TreeOfThoughts(tot(breadth=breadth, thoughts=4), process_scorer=TableScorer()), lm,
                 Budget(total_tokens=10_000))
    assert {state for state, _ in expanded(lm)[1]} == kept
    assert all(n == 4 for calls in expanded(lm).values() for _, n in calls)
    assert all(len(calls) <= breadth for calls in expanded(lm).values())
    assert "Guess 40." not in {state for calls in expanded(lm).values() for state, _ in calls}  # never kept
    assert result.answer == "42"


def test_self_evaluation_by_the_policy_model_with_the_value_prompt():
    valued: list[Prompt] = []

    def reply(prompt, params, call, i):
        if prompt.messages[0].content == DEFAULT_VALUE_SYSTEM:  # ToT's value prompt
            valued.append(prompt)
            newest = prompt.messages[-1].content.split("\n\nEvaluate")[0].splitlines()[-1]
            if any(step in newest for step in RIGHT):
                return "sure"
            return "Hmm, likely" if "Write" in newest else "impossible"
        return next_thought(TREE, prompt, i)

    lm = ScriptedBackend(reply)
    algorithm = TreeOfThoughts(tot(breadth=2, thoughts=4))
    result = run(algorithm, lm, Budget(total_tokens=20_000))

    assert result.answer == "42"
    assert result.candidates[result.search.chosen].steps == RIGHT
    assert result.candidates[result.search.chosen].step_scores == (1.0, 1.0, 1.0)
    assert algorithm.options_dict()["process_scorer"] == "tot-value"
    # one value request of n=3 per new state, charged as scoring of the policy model
    value_calls = [c for c in lm.calls if c.prompt.messages[0].content == DEFAULT_VALUE_SYSTEM]
    assert all(c.params.n == 3 and c.params.temperature == 0.7 for c in value_calls)
    s = result.search
    assert s.scoring_calls == len(value_calls) == 4 + 4 + 2 and result.spent.scorer_generations == 3 * 10
    assert s.round_trips == s.steps + 3
    assert sum(1 for r in result.trace if r.kind == "scorer") == len(value_calls)
    # the second level's states are shown whole, numbered
    assert "Step 1: Multiply 6 by 7.\nStep 2: 6 * 7 = 42." in "".join(p.messages[-1].content for p in valued)
    # Write (likely) beat Add and Guess (impossible) to the second place of level 1
    level1 = [c for c in lm.calls if c.prompt.assistant_prefix.count(D) == 1]
    assert sorted(c.prompt.assistant_prefix for c in level1) == ["Multiply 6 by 7." + D, "Write 6 * 7." + D]


def test_self_evaluation_samples_are_seeded_from_the_run_s_seed():
    def reply(prompt, params, call, i):
        if prompt.messages[0].content == DEFAULT_VALUE_SYSTEM:
            return "likely"
        return next_thought(TREE, prompt, i)

    def value_seeds(seed):
        lm = ScriptedBackend(reply)
        asyncio.run(TreeOfThoughts(tot(breadth=2, thoughts=2)).run(lm, QUESTION, Budget(generations=6), seed=seed))
        return [(c.prompt.messages[-1].content, c.params.seed) for c in lm.calls
                if c.prompt.messages[0].content == DEFAULT_VALUE_SYSTEM]

    first = value_seeds(1)
    seeds = [s for _, s in first]
    assert seeds and None not in seeds and len(set(seeds)) == len(seeds)  # every state its own draws
    assert value_seeds(1) == first  # a seeded run is reproducible, its valuation too
    assert set(seeds).isdisjoint(s for _, s in value_seeds(2))
    unseeded = ScriptedBackend(reply)
    asyncio.run(TreeOfThoughts(tot(breadth=2, thoughts=2)).run(unseeded, QUESTION, Budget(generations=6)))
    assert all(c.params.seed is None for c in unseeded.calls)


def test_read_value_weighs_the_words_as_the_paper():
    def samples(*texts):
        return [Sample(t, "stop", 1) for t in texts]

    assert read_value(samples("sure", "Sure.", "It is SURE")) == 1.0
    assert read_value(samples("likely", "impossible", "no idea")) == pytest.approx(
        (VALUE_WEIGHTS["likely"] + VALUE_WEIGHTS["impossible"]) / 3)
    assert read_value(samples("impossible at first, but on reflection: sure")) == 1.0  # the last word counts
    assert read_value(samples("unsure", "I can't tell")) is None
    assert VALUE_WEIGHTS["sure"] / VALUE_WEIGHTS["likely"] == 20 and VALUE_WEIGHTS["likely"] / \
        VALUE_WEIGHTS["impossible"] == pytest.approx(1000)


def test_an_outside_process_scorer_the_game_of_24_verifier():
    # three of the four finished states say 36 (a majority vote would pick it); the verifier knows 24
    tree = {"": ["Add the ones and 4.", "Multiply 4 by 6."],
            "Add the ones and 4.": ["(1 + 1 + 4) * 6 = 36. The answer is 36."],
            "Multiply 4 by 6.": ["(1 + 1 + 4) * 6 = 36. The answer is 36.", "4 * 6 * 1 * 1 = 24. The answer is 24."]}
    verifier = CallableVerifier(game24_verifier)
    algorithm = TreeOfThoughts(tot(breadth=2, thoughts=2), process_scorer=verifier)
    result = run(algorithm, tree_backend(tree), Budget(generations=4), question="Use 1 1 4 6 to make 24.")
    assert [c.answer for c in result.candidates].count("36") == 3
    assert result.answer == "24" and result.candidates[result.search.chosen].score == 1.0
    assert algorithm.options_dict()["process_scorer"] == "game24_verifier"
    assert result.spent.generations == 4 and result.search.scoring_calls == 2  # no tokens, one call per level


def test_a_generation_budget_caps_finished_and_live_states():
    # N = 3: the two kept states hold 2 generations and may take 1 more: the better state asks
    # for its k = 2 thoughts, the other for 1
    lm = tree_backend()
    result = run(TreeOfThoughts(tot(breadth=2, thoughts=2), process_scorer=TableScorer()), lm, Budget(generations=3))
    assert expanded(lm)[0] == [("", 2)] and expanded(lm)[1] == [("Multiply 6 by 7.", 2), ("Guess 40.", 1)]
    assert result.spent.generations == len(result.candidates) <= 3 and result.search.width == 3
    assert result.answer == "42"


def test_a_refused_level_ends_the_search_with_its_live_states_as_candidates():
    lm = tree_backend()
    options = tot(breadth=2, thoughts=2, steps=StepOptions(max_step_tokens=8))
    result = run(TreeOfThoughts(options, process_scorer=TableScorer()), lm, Budget(output_tokens=30))
    assert result.exhausted and result.spent.output_tokens <= 30
    assert result.spent.generations == len(result.candidates) >= 1
    assert any(c.finish_reason == "length" for c in result.candidates)  # live states the budget cut short
    # a refused valuation ends it too: a charged scorer with no input tokens left
    judge = ScriptedBackend(["1"])
    result = run(TreeOfThoughts(tot(breadth=2, thoughts=2), process_scorer=TableScorer(backend=judge)),
                 tree_backend(), Budget(input_tokens=40))
    assert result.exhausted and result.spent.input_tokens <= 40
    assert result.spent.generations == len(result.candidates)


def test_the_depth_limit_is_max_steps():
    lm = tree_backend({"": ["Think."], "Think.": ["More."], "Think.|More.": ["Still."]})
    result = run(TreeOfThoughts(tot(breadth=1, thoughts=1, steps=StepOptions(max_steps=2)),
                                process_scorer=TableScorer()), lm, Budget(total_tokens=1000))
    [state] = result.candidates
    assert state.steps == ("Think.", "More.") and state.finish_reason == "length" and result.search.steps == 2


def test_tot_needs_continuation_and_checks_its_options():
    class NoContinuation(ScriptedBackend):
        @property
        def capabilities(self):
            return replace(super().capabilities, continuation=False)

    with pytest.raises(ConfigError, match="cannot do"):
        run(TreeOfThoughts(), NoContinuation(["x"]), Budget(generations=2))
    for bad in ({"breadth": 0}, {"thoughts": 0}, {"width": 0}, {"aggregation": "median"}):
        with pytest.raises(ConfigError):
            TreeOfThoughtsOptions(**bad)
    for bad in ({"samples": 0}, {"temperature": 3.0}, {"template": "Rate it."}):
        with pytest.raises(ConfigError):
            ThoughtValueOptions(**bad)
    assert TreeOfThoughtsOptions().sampling.system_prompt == STEP_SYSTEM_PROMPT


def test_options_from_a_step_search():
    search = SearchOptions(beam_width=5, width=7, aggregation="min", vote=True, steps=StepOptions(max_steps=4))
    options = TreeOfThoughtsOptions.from_search(search, breadth=2)
    o = options
    assert (o.breadth, o.thoughts, o.width, o.aggregation, o.vote) == (2, 5, 7, "min", True)
    assert options.steps.max_steps == 4 and options.sampling == search.sampling


def test_prior_candidates_take_part_in_the_choice():
    first = run(TreeOfThoughts(tot(breadth=2, thoughts=4), process_scorer=TableScorer()), tree_backend(),
                Budget(generations=8))
    again = run(TreeOfThoughts(tot(breadth=1, thoughts=1), process_scorer=TableScorer()),
                ScriptedBackend(["The answer is 7."]), Budget(generations=1), prior=first.candidates)
    assert len(again.candidates) == len(first.candidates) + 1 and again.answer == "42"


# -- the budget ------------------------------------------------------------------------------------

STEP_TEXTS = ["We add 3.", "So 7.", "carry the one", "The answer is 7.", "The answer is 12.", "", "Hmm",
              "long " * 12, "\\boxed{7}", "Then 3 and 4"]
VALUE_TEXTS = ["sure", "likely", "impossible", "no idea", "long " * 10 + "sure"]


def random_tree(salt: int):
    """A deterministic random tree (and random values where the value prompt is asked)."""
    def reply(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str:
        key = f"{salt}|{prompt.key()}|{i}|{params.seed}".encode()
        h = zlib.crc32(key)
        if prompt.is_chat and prompt.messages[0].content == DEFAULT_VALUE_SYSTEM:
            return VALUE_TEXTS[h % len(VALUE_TEXTS)]
        return STEP_TEXTS[h % len(STEP_TEXTS)] + (D + "more" if h % 3 else "")

    return reply


@st.composite
def budgets(draw):
    limits = {
        "generations": st.integers(1, 10),
        "input_tokens": st.integers(1, 1500),
        "output_tokens": st.integers(1, 300),
        "total_tokens": st.integers(1, 1500),
        "usd": st.sampled_from([0.0005, 0.001, 0.003, 0.01]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=4, unique=True))
    return Budget(**{name: draw(limits[name]) for name in chosen})


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=budgets(), salt=st.integers(0, 10_000), breadth=st.integers(1, 3), thoughts=st.integers(1, 3),
       width=st.one_of(st.none(), st.integers(1, 8)), native_n=st.booleans(),
       scorer=st.sampled_from(["self", "table", "charged-table"]), every_tokens=st.one_of(st.none(), st.integers(1, 4)),
       max_tokens=st.integers(2, 30), max_steps=st.integers(1, 5))
def test_no_limit_is_ever_exceeded_and_every_candidate_is_one_generation(
        budget, salt, breadth, thoughts, width, native_n, scorer, every_tokens, max_tokens, max_steps):
    price = Price(1.0, 2.0)
    lm = ScriptedBackend(random_tree(salt), native_n=native_n, price=price)
    table = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS},
                        backend=ScriptedBackend(["1"], price=price) if scorer == "charged-table" else None)
    options = tot(sampling=SamplingOptions(max_tokens=max_tokens, min_tokens=1), breadth=breadth, thoughts=thoughts,
                  width=width, steps=StepOptions(every_tokens=every_tokens, max_steps=max_steps, max_step_tokens=6),
                  value=ThoughtValueOptions(max_tokens=4))
    ledger = Ledger(budget)
    algorithm = TreeOfThoughts(options, process_scorer=None if scorer == "self" else table)
    result = asyncio.run(algorithm.run(lm, QUESTION, ledger, seed=3))
    spent = result.spent

    assert not spent.violations(budget)
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)
    n = width if width is not None else options.most_paths
    if budget.generations is not None:
        n = min(n, budget.generations)
        assert ledger.remaining().generations == budget.generations - spent.generations  # no hold left behind
    assert spent.generations == len(result.candidates) <= n
    assert all(c.steps is not None and len(c.steps) <= max_steps for c in result.candidates)
    s = result.search
    assert s.requests == sum(1 for r in result.trace if r.kind == "continuation")
    assert s.scoring_calls == sum(1 for r in result.trace if r.kind == "scorer")
    assert not any(r.kind == "policy" for r in result.trace)
    # each level: at most `breadth` states, each asking for at most k thoughts
    thought_calls = [c for c in lm.calls if not (c.prompt.is_chat and c.prompt.messages[0].content
                                                 == DEFAULT_VALUE_SYSTEM)]
    assert all(c.params.n <= thoughts for c in thought_calls)
    if every_tokens is None:  # a state's depth can be read from its prefix
        levels: dict[int, set[str]] = {}
        for c in thought_calls:
            levels.setdefault(len(_steps_of(c.prompt.assistant_prefix)), set()).add(c.prompt.assistant_prefix)
        assert all(len(prefixes) <= (1 if depth == 0 else breadth) for depth, prefixes in levels.items())
