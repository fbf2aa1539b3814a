"""Budget-aware value tree search: scripted trees whose right path is known, the token pool split by
value (and never passed, by any subtree), the requests of each search step, and the budget held
in every unit."""

import asyncio
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms import value_tree_search
from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.steps import STEP_SYSTEM_PROMPT, Path, SearchOptions, StepOptions
from apportion.algorithms.value_tree_search import (
    ShareTree,
    ValueTreeSearch,
    ValueTreeSearchOptions,
    proportional,
    token_pool,
)
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price
from apportion.errors import ConfigError
from apportion.lm.scripted import ScriptedBackend
from tests.conftest import examples
from tests.unit.test_search import (
    QUESTION,
    STEP_TEXTS,
    TableScorer,
    budgets,
    by_depth,
    check_search_within_budget,
    random_tree,
    search_width,
    tree_backend,
)

D = "\n\n"
GOOD = ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")


def run(algorithm, backend, budget, **kwargs):
    return asyncio.run(algorithm.run(backend, QUESTION, budget, seed=1, **kwargs))


def search(scorer=None, **options):
    return ValueTreeSearch(ValueTreeSearchOptions(**options), process_scorer=scorer or TableScorer())


def step_output(result) -> int:
    """The output tokens of the search's step requests (the scorer's calls aside)."""
    return sum(r.usage.output_tokens for r in result.trace if r.kind == "continuation")


def cap_of(backend, prefix: str) -> list[int]:
    return [c.params.max_tokens for c in backend.calls if c.prompt.assistant_prefix == prefix]


# -- the search on known trees ----------------------------------------------------------------------


def test_finds_the_known_path_with_one_request_per_node_and_one_scoring_call_per_step():
    lm, judge = tree_backend(), ScriptedBackend(["1"])
    result = run(search(TableScorer(backend=judge), branching=2), lm, Budget(generations=4))

    assert result.answer == "42" and result.algorithm == "value-tree-search"
    chosen = result.candidates[result.search.chosen]
    assert chosen.steps == GOOD and chosen.score == 0.99 and chosen.finish_reason == "stop"
    # step 1: the root, n=2; step 2: both leaves, n=2 each (N=4 paths, at most k=2 each); step 3:
    # "Guess 40." ended in two answers of 13, and the 2 paths left go by value 0.95 : 0.3, both to
    # "6 * 7 = 42." ("6 * 7 = 41." is pruned)
    assert by_depth(lm) == {0: [2], 1: [2, 2], 2: [2]}
    assert cap_of(lm, "Multiply 6 by 7." + D + "6 * 7 = 41." + D) == []
    assert all(c.params.stop == (D,) for c in lm.calls)
    s = result.search
    assert (s.steps, s.requests, s.scoring_calls, s.round_trips) == (3, 4, 3, 6) and s.width == 4
    assert s.scoring_calls == len(judge.calls)
    assert result.spent.generations == len(result.candidates) == 4
    assert result.exhausted and "generations" in result.exhausted_reason


def test_the_pool_is_split_among_children_by_value():
    # the notional pool: max_tokens x N = 512 x 4 = 2048. The root's request wrote "Guess 40." and
    # "Multiply 6 by 7." (2 + 4 tokens); the other 2042 go 0.1 : 0.9, so "Guess 40." has 204 tokens
    # for its 2 children (102 each), "Multiply 6 by 7." 1838 (each child a full step of 256)
    lm = tree_backend()
    result = run(search(branching=2), lm, Budget(generations=4))
    assert cap_of(lm, "") == [256]
    assert cap_of(lm, "Guess 40." + D) == [102]
    assert cap_of(lm, "Multiply 6 by 7." + D) == [256]
    assert step_output(result) <= 2048


def test_a_branch_worth_nothing_gets_no_tokens_and_its_generation_goes_to_the_valued_one():
    tree = {"": ["Good.", "Bad."], "Good.": ["The answer is 5.", "The answer is 6."]}
    table = {"Good.": 0.9, "Bad.": 0.0, "The answer is 5.": 0.9, "The answer is 6.": 0.3}
    lm = tree_backend(tree)
    result = run(search(TableScorer(table), branching=2), lm, Budget(generations=2, output_tokens=400))

    assert not [c for c in lm.calls if c.prompt.assistant_prefix.startswith("Bad.")]  # never expanded
    # "Bad." was pruned (its hold given back), so "Good." could ask for 2 children under N=2
    assert by_depth(lm) == {0: [2], 1: [2]}
    assert sorted(c.steps for c in result.candidates) == [("Good.", "The answer is 5."), ("Good.", "The answer is 6.")]
    assert result.answer == "5"
    assert result.spent.generations == len(result.candidates) == 2
    assert result.spent.output_tokens <= 400


def test_paths_go_where_the_value_is():
    # N=4, k=4: the root's 4 children are worth 0.1, 0.9, 0.2 and 0.6; the 4 paths of the next step
    # go 0 : 2 : 1 : 1 (largest remainders of 0.22 : 2 : 0.44 : 1.33), so "Guess 40." is pruned
    # and "Multiply 6 by 7." branches, finding 6 * 7 = 42 beside 41
    lm = tree_backend()
    result = run(search(branching=4), lm, Budget(generations=4))
    assert by_depth(lm)[0] == [4]
    assert [(c.prompt.assistant_prefix, c.params.n) for c in lm.calls[1:4]] == [
        ("Multiply 6 by 7." + D, 2), ("Write 6 * 7." + D, 1), ("Add 6 and 7." + D, 1)]
    assert not cap_of(lm, "Guess 40." + D)
    assert result.answer == "42" and result.candidates[result.search.chosen].steps == GOOD


def test_a_spent_pool_ends_the_search_and_keeps_its_last_path_as_a_candidate():
    lm = ScriptedBackend(lambda prompt, params, call, i: "Think more." + D + "and on")
    result = run(search(branching=1, steps=StepOptions(max_steps=50)), lm, Budget(output_tokens=40))
    # each step writes 2 tokens; a step is asked for only while the share pays for min_tokens (32)
    assert [c.params.max_tokens for c in lm.calls] == [40, 38, 36, 34, 32]
    [path] = result.candidates
    assert len(path.steps) == 5 and path.finish_reason == "length" and path.answer is None
    assert result.spent.output_tokens == 10 and result.spent.generations == 1
    assert result.exhausted and "pool of 40 output tokens" in result.exhausted_reason


def test_a_budget_too_small_for_one_step_asks_for_nothing():
    lm = tree_backend()
    result = run(search(), lm, Budget(output_tokens=8))
    assert lm.calls == [] and result.candidates == () and result.answer is None
    assert result.exhausted and result.spent.generations == 0


def test_the_deadline_ends_the_search_with_its_live_paths():
    lm = ScriptedBackend(lambda prompt, params, call, i: "Think more." + D, latency_s=0.05)
    result = run(search(branching=2, width=2, steps=StepOptions(max_steps=1000)), lm, Budget(seconds=0.3))
    assert result.exhausted and result.spent.seconds < 1.5
    assert 1 <= len(result.candidates) <= 2 and result.spent.generations == len(result.candidates)
    assert all(c.finish_reason in ("length", "deadline") and len(c.steps) >= 1 for c in result.candidates)


def test_the_token_pool_comes_from_the_tightest_token_limit_along_the_ledgers():
    sampling = SamplingOptions(max_tokens=100)
    assert token_pool(Ledger(Budget(generations=4)), sampling, 4) == 400
    assert token_pool(Ledger(Budget(output_tokens=70, total_tokens=90)), sampling, 4) == 70
    parent = Ledger(Budget(total_tokens=50))
    assert token_pool(parent.child(Budget(generations=3)), sampling, 3) == 50


def test_aggregation_is_the_reward_and_the_answer_the_best_finished_leaf():
    # by the newest step B's path is best (0.9 > 0.6); by its weakest step A's (0.6 > 0.4)
    tree = {"": ["A.", "B."], "A.": ["The answer is 1."], "B.": ["The answer is 2."]}
    table = {"A.": 0.6, "B.": 0.4, "The answer is 1.": 0.6, "The answer is 2.": 0.9}
    for how, answer in (("last", "2"), ("min", "1")):
        result = run(search(TableScorer(table), branching=2, aggregation=how), tree_backend(tree),
                     Budget(generations=2))
        assert result.answer == answer


def test_weighted_vote_sums_scores_per_answer():
    tree = {"": ["A.", "B.", "C."], "A.": ["The answer is 41."], "B.": ["The answer is 41."],
            "C.": ["The answer is 42."]}
    table = {"A.": 0.5, "B.": 0.5, "C.": 0.5, "The answer is 41.": 0.6, "The answer is 42.": 0.9}
    best = run(search(TableScorer(table)), tree_backend(tree), Budget(generations=3))
    vote = run(search(TableScorer(table), vote=True), tree_backend(tree), Budget(generations=3))
    assert best.answer == "42"
    assert vote.answer == "41" and vote.distribution == pytest.approx({"41": 1.2, "42": 0.9})


def test_a_search_needs_a_process_scorer():
    with pytest.raises(ConfigError, match="process scorer"):
        run(ValueTreeSearch(), tree_backend(), Budget(generations=2))


def test_options_are_checked_and_read_from_search_options():
    for bad, match in (({"branching": 0}, "branching"), ({"gamma": 1.5}, "gamma"), ({"gamma": -0.1}, "gamma"),
                       ({"width": 0}, "width"), ({"aggregation": "median"}, "aggregation")):
        with pytest.raises(ConfigError, match=match):
            ValueTreeSearchOptions(**bad)
    assert ValueTreeSearchOptions().sampling.system_prompt == STEP_SYSTEM_PROMPT
    made = ValueTreeSearchOptions.from_search(SearchOptions(beam_width=5, width=6, aggregation="min", vote=True),
                                              gamma=0.5)
    assert (made.branching, made.width, made.aggregation, made.vote, made.gamma) == (5, 6, "min", True, 0.5)
    assert search().options_dict()["process_scorer"] == "table"


# -- the share tree ----------------------------------------------------------------------------------


def path(*steps: str, scores=None, tokens: int = 0, ended: str | None = None) -> Path:
    return Path(steps, tuple(scores or (0.5,) * len(steps)), ended, tokens)


def test_proportional_parts_add_up_exactly():
    assert proportional(10, [0.9, 0.1]) == [9, 1]
    assert proportional(10, [1, 1, 1]) == [4, 3, 3]
    assert proportional(7, [0, 0]) == [4, 3]  # no value anywhere: equal parts
    assert proportional(5, [0.0, 2.0]) == [0, 5]
    assert proportional(2042, [0.1, 0.9]) == [204, 1838]
    assert proportional(0, []) == []
    assert proportional(4, [0.9, 0.1], [2, 2]) == [2, 2]  # what a capped part cannot take goes on
    assert proportional(3, [1.0, 0.0, 0.0], [1, 5, 5]) == [1, 1, 1]
    with pytest.raises(ValueError):
        proportional(3, [1.0], [2])


def test_a_closed_subtree_hands_its_unspent_share_to_its_siblings():
    tree = ShareTree(100, gamma=0.9, aggregation="last")
    a, b = tree.grow(tree.root, [path("A.", scores=(0.5,)), path("B.", scores=(0.5,))])
    assert (a.share, b.share) == (50, 50)
    [done] = tree.grow(a, [path("A.", "The answer is 1.", scores=(0.5, 0.9), tokens=10, ended="answer")])
    assert a.spent == 10 and not a.open and not done.open
    assert (b.share, b.free) == (90, 90)
    tree.prune(b)
    assert tree.unused == 90 and not tree.root.open and tree.live() == []


@pytest.mark.parametrize(("gamma", "to_a", "to_b"), [(0.0, 43, 51), (1.0, 63, 31)])
def test_gamma_weighs_what_a_subtree_found_when_tokens_are_split_again(gamma, to_a, to_b):
    # 300 tokens go 0.5 : 0.6 : 0.5 to A, B, C (94, 112, 94). A finds a child worth 0.9 and B one
    # worth 0.1, each spending its whole share on it; then C closes, handing back its 94, which
    # A and B split by value: gamma 0, by their own rewards 0.5 : 0.6; gamma 1, by 1.4 : 0.7
    tree = ShareTree(300, gamma=gamma, aggregation="last")
    a, b, c = tree.grow(tree.root, [path("A.", scores=(0.5,)), path("B.", scores=(0.6,)), path("C.", scores=(0.5,))])
    assert (a.share, b.share, c.share) == (94, 112, 94)
    [a1] = tree.grow(a, [path("A.", "A1.", scores=(0.5, 0.9), tokens=a.free)])
    [b1] = tree.grow(b, [path("B.", "B1.", scores=(0.6, 0.1), tokens=b.free)])
    assert a1.free == b1.free == 0
    tree.prune(c)
    assert (a1.free, b1.free) == (to_a, to_b)
    assert (a.share, b.share) == (94 + to_a, 112 + to_b)
    assert tree.value(a) == pytest.approx(0.5 + gamma * 0.9)


@pytest.mark.parametrize(("gamma", "to_a1", "to_b1"), [(0.0, 1, 2), (1.0, 2, 1)])
def test_gamma_weighs_what_a_subtree_found_when_paths_are_split(gamma, to_a1, to_b1):
    # A (0.5) has a live child worth 0.9, B (0.6) one worth 0.1: 3 paths go 0.5 : 0.6 with gamma 0,
    # 1.4 : 0.7 with gamma 1
    tree = ShareTree(300, gamma=gamma, aggregation="last")
    a, b = tree.grow(tree.root, [path("A.", scores=(0.5,)), path("B.", scores=(0.6,))])
    [a1] = tree.grow(a, [path("A.", "A1.", scores=(0.5, 0.9))])
    [b1] = tree.grow(b, [path("B.", "B1.", scores=(0.6, 0.1))])
    counts = tree.paths_for(3, lambda node: 3)
    assert (counts[id(a1)], counts[id(b1)]) == (to_a1, to_b1)
    # no leaf takes more than it can: the rest goes to the other
    counts = tree.paths_for(3, lambda node: 1 if node is b1 else 3)
    assert (counts[id(a1)], counts[id(b1)]) == (2, 1)
    assert tree.paths_for(9, lambda node: 2) == {id(a1): 2, id(b1): 2}


def test_live_leaves_come_best_first():
    tree = ShareTree(90, gamma=0.9, aggregation="last")
    tree.grow(tree.root, [path("A.", scores=(0.2,)), path("B.", scores=(0.7,)), path("C.", scores=(0.7,))])
    assert [n.path.steps for n in tree.live()] == [("B.",), ("C.",), ("A.",)]
    with pytest.raises(ValueError):
        tree.grow(tree.root, [path("D.")])


@settings(max_examples=examples(200), deadline=None)
@given(pool=st.integers(0, 2000), gamma=st.floats(0, 1), data=st.data())
def test_no_subtree_ever_spends_more_than_its_share(pool, gamma, data):
    tree = ShareTree(pool, gamma=gamma, aggregation="last")
    for _ in range(data.draw(st.integers(1, 25))):
        live = tree.live()
        if not live:
            break
        node = data.draw(st.sampled_from(live))
        if data.draw(st.booleans()) and node.free >= 1:
            count = data.draw(st.integers(1, 3))
            cap = node.free // count
            kids = [Path((*node.path.steps, f"s{i}"), (*node.path.step_scores, data.draw(st.floats(0, 1))),
                         data.draw(st.sampled_from([None, None, "answer"])),
                         node.path.tokens + data.draw(st.integers(0, cap)))
                    for i in range(count if cap else 0)]
            if kids:
                tree.grow(node, kids)
                continue
        tree.prune(node)
        nodes = tree.root.subtree()
        assert all(n.subtree_spent() <= n.share for n in nodes)
        assert sum(n.spent for n in nodes) + sum(n.free for n in nodes) + tree.unused == tree.pool
        assert all(n.free == 0 for n in nodes if not n.live)
    nodes = tree.root.subtree()
    assert all(n.subtree_spent() <= n.share for n in nodes)
    assert sum(n.spent for n in nodes) + sum(n.free for n in nodes) + tree.unused == tree.pool


# -- the budget ----------------------------------------------------------------------------------------


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=budgets(),
    salt=st.integers(0, 10_000),
    branching=st.integers(1, 4),
    gamma=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    width=st.one_of(st.none(), st.integers(1, 8)),
    native_n=st.booleans(),
    charged_scorer=st.booleans(),
    every_tokens=st.one_of(st.none(), st.integers(1, 4)),
    max_tokens=st.integers(2, 30),
    min_tokens=st.integers(1, 8),
    max_steps=st.integers(1, 5),
)
def test_no_limit_is_ever_exceeded_and_the_steps_never_pass_the_pool(
        budget, salt, branching, gamma, width, native_n, charged_scorer, every_tokens, max_tokens, min_tokens,
        max_steps):
    price = Price(1.0, 2.0)
    lm = ScriptedBackend(random_tree(salt), native_n=native_n, price=price)
    judge = ScriptedBackend(["1"], price=price) if charged_scorer else None
    scorer = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS}, backend=judge)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=min_tokens)
    options = ValueTreeSearchOptions(sampling, StepOptions(every_tokens=every_tokens, max_steps=max_steps,
                                                           max_step_tokens=6),
                                     branching=branching, gamma=gamma, width=width)
    ledger = Ledger(budget)
    n = search_width(budget, width)
    pool = token_pool(ledger, sampling, n)
    trees: list[ShareTree] = []

    class Kept(ShareTree):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trees.append(self)

    with pytest.MonkeyPatch.context() as patch:  # to see the tree the search ran on
        patch.setattr(value_tree_search, "ShareTree", Kept)
        result = asyncio.run(ValueTreeSearch(options, process_scorer=scorer).run(lm, QUESTION, ledger, seed=3))
    [tree] = trees
    nodes = tree.root.subtree()
    assert tree.pool == pool
    assert all(node.subtree_spent() <= node.share for node in nodes)
    assert sum(node.spent for node in nodes) == step_output(result) <= pool

    check_search_within_budget(result, ledger, budget, n, lm, max_steps)
    # the root's request fits the pool as asked: n children of at most max_tokens each
    assert all(c.params.n * c.params.max_tokens <= pool for c in lm.calls if not c.prompt.assistant_prefix)
