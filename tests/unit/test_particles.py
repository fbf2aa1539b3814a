"""Particle filtering and particle Gibbs: the resampling functions as pure functions, the requests
each search step makes on scripted trees whose right path is known, finished particles never
revived, the Gibbs reference compared at the same step, and the budget held in every unit."""

import asyncio
import random
import zlib
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.particle_filtering import (
    ANSWERS,
    RESAMPLING,
    WEIGHTINGS,
    ParticleFiltering,
    ParticleFilteringOptions,
    ParticleGibbs,
    ParticleGibbsOptions,
    effective_sample_size,
    multinomial,
    resample,
    should_resample,
    systematic,
    weigh,
)
from apportion.algorithms.steps import SearchOptions, StepOptions
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price
from apportion.errors import ConfigError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.scripted import ScriptedBackend
from tests.conftest import examples
from tests.unit.test_search import (
    QUESTION,
    STEP_TEXTS,
    D,
    TableScorer,
    budgets,
    by_depth,
    check_search_within_budget,
    random_tree,
    search_width,
    tree_backend,
)

# The right path: "Multiply 6 by 7." -> "6 * 7 = 42." -> "The answer is 42." (what the model
# writes after each prefix, by sample index, cycled; unknown prefixes answer 13)
TREE = {
    "": ["Guess 40.", "Multiply 6 by 7.", "Add 6 and 7.", "Write 6 * 7."],
    "Multiply 6 by 7.": ["6 * 7 = 41.", "6 * 7 = 42."],
    "Write 6 * 7.": ["That is 48.", "That is 13."],
    "Multiply 6 by 7.|6 * 7 = 42.": ["The answer is 42."],
    "Multiply 6 by 7.|6 * 7 = 41.": ["The answer is 41."],
    "Write 6 * 7.|That is 48.": ["The answer is 48."],
}
SCORES = {"Guess 40.": 0.1, "Multiply 6 by 7.": 0.9, "Add 6 and 7.": 0.2, "Write 6 * 7.": 0.6,
          "6 * 7 = 41.": 0.3, "6 * 7 = 42.": 0.95, "That is 48.": 0.4, "That is 13.": 0.1,
          "The answer is 42.": 0.99, "The answer is 41.": 0.3, "The answer is 48.": 0.4, "The answer is 13.": 0.2}
RIGHT = ("Multiply 6 by 7.", "6 * 7 = 42.", "The answer is 42.")


def run(algorithm, backend, budget, seed=1, **kwargs):
    return asyncio.run(algorithm.run(backend, QUESTION, budget, seed=seed, **kwargs))


def prefixes(backend: ScriptedBackend) -> list[str]:
    """The assistant text every step request continued, in order."""
    return [c.prompt.assistant_prefix for c in backend.calls]


def pf(**options) -> ParticleFiltering:
    scorer = options.pop("scorer", None) or TableScorer(SCORES)
    return ParticleFiltering(ParticleFilteringOptions(**options), process_scorer=scorer)


def pg(**options) -> ParticleGibbs:
    scorer = options.pop("scorer", None) or TableScorer(SCORES)
    return ParticleGibbs(ParticleGibbsOptions(**options), process_scorer=scorer)


# -- weights and resampling as pure functions -----------------------------------------------------


def test_weights_are_the_softmax_of_logits_or_powers_of_the_scores():
    assert weigh([0.5, 0.5]) == [0.5, 0.5]
    assert weigh([0.9, 0.5]) == pytest.approx([0.9, 0.1])  # odds 9 : 1
    assert weigh([0.9, 0.5], temperature=0.5) == pytest.approx([81 / 82, 1 / 82])  # odds squared
    assert weigh([0.6, 0.2], "score") == pytest.approx([0.75, 0.25])
    assert weigh([0.6, 0.2], "score", temperature=0.5) == pytest.approx([0.9, 0.1])
    # an unscored prefix has no weight; scores of 0 and 1 are clipped, not infinite
    assert weigh([None, 0.9, 0.5]) == [None, pytest.approx(0.9), pytest.approx(0.1)]
    assert weigh([1.0, 0.0]) == pytest.approx([1.0, 0.0]) and weigh([1.0, 0.0])[1] > 0
    assert weigh([0.0, 0.0], "score") == [0.5, 0.5] and weigh([0.0, 0.7], "score") == [0.0, 1.0]
    assert weigh([None, None]) == [None, None]
    with pytest.raises(ConfigError, match="weighting"):
        weigh([0.5], "odds")


def test_the_effective_sample_size_and_when_it_triggers_resampling():
    assert effective_sample_size([0.25] * 4) == pytest.approx(4)
    assert effective_sample_size([1.0, 0.0, 0.0, 0.0]) == 1
    assert effective_sample_size([0.5, 0.5, 0.0, None]) == pytest.approx(2)
    assert effective_sample_size([None, None]) == 0
    # equal weights: no resampling below a threshold of 1; 1.0 resamples every step
    assert not should_resample([0.25] * 4, 0.5) and not should_resample([0.25] * 4, 0.99)
    assert should_resample([0.25] * 4, 1.0)
    assert should_resample([0.97, 0.01, 0.01, 0.01], 0.5) and not should_resample([0.97, 0.01, 0.01, 0.01], 0.0)
    assert not should_resample([0.4, 0.3, 0.3], 0.5)  # ESS 2.94 of 3
    assert not should_resample([None, None], 1.0)  # nothing to tell them apart by


def test_systematic_resampling_gives_the_floor_or_ceiling_of_the_expected_copies_multinomial_varies():
    weights = [0.5, 0.25, 0.25]
    seeds = range(300)
    sys_counts = {tuple(Counter(systematic(weights, 4, random.Random(s))).get(i, 0) for i in range(3))
                  for s in seeds}
    assert sys_counts == {(2, 1, 1)}
    draws = [tuple(Counter(multinomial(weights, 4, random.Random(s))).get(i, 0) for i in range(3)) for s in seeds]
    assert len(set(draws)) > 3  # e.g. (4, 0, 0), (1, 2, 1), ...
    mean = [sum(d[i] for d in draws) / len(draws) for i in range(3)]
    assert mean == pytest.approx([2, 1, 1], abs=0.15)  # the same copies on average
    variance = sum((d[0] - 2) ** 2 for d in draws) / len(draws)
    assert variance == pytest.approx(4 * 0.5 * 0.5, abs=0.25)  # binomial, against systematic's 0
    # 0.3 * 5 = 1.5 copies: systematic gives 1 or 2, never 0 or 3
    assert {Counter(systematic([0.3, 0.7], 5, random.Random(s)))[0] for s in seeds} == {1, 2}
    # ancestors come sorted, zero weights are never drawn, no weight at all draws alike
    for method in RESAMPLING:
        for s in range(20):
            idx = resample([0.0, 0.6, 0.0, 0.4], 6, random.Random(s), method)
            assert idx == sorted(idx) and set(idx) <= {1, 3} and len(idx) == 6
        assert resample([None, None], 2, random.Random(0), method) in ([0, 0], [0, 1], [1, 1])
        assert resample([0.5], 0, random.Random(0), method) == [] and resample([], 3, random.Random(0), method) == []
    with pytest.raises(ConfigError, match="resampling"):
        resample([1.0], 1, random.Random(0), "stratified")


# -- particle filtering -----------------------------------------------------------------------------


@pytest.mark.parametrize("resampling", RESAMPLING)
def test_particle_filtering_finds_the_known_path(resampling):
    for seed in range(6):
        lm = tree_backend(TREE)
        result = run(pf(resampling=resampling), lm, Budget(generations=4), seed=seed)
        assert result.answer == "42"
        chosen = result.candidates[result.search.chosen]
        assert chosen.steps == RIGHT and chosen.step_scores == (0.9, 0.95, 0.99) and chosen.score == 0.99
        assert result.spent.generations == len(result.candidates) == 4
        assert result.spent.continuations == sum(c.params.n for c in lm.calls)
        assert by_depth(lm)[0] == [4]  # the first step: one request of n=N
        # "Multiply" outweighs the rest (odds 9 against 1.5 and less): resampled, it leads
        multiply = [c.params.n for c in lm.calls if c.prompt.assistant_prefix == RIGHT[0] + D]
        assert multiply[0] >= 2 and result.search.steps == 3


def test_each_step_is_one_round_one_request_per_distinct_prefix_with_n_its_copies():
    tree = {"": ["A.", "B.", "C.", "D."], "A.": ["The answer is 1.", "The answer is 2."], "B.": ["The answer is 3."],
            "C.": ["The answer is 4."], "D.": ["The answer is 5."]}
    scores = {"A.": 0.5, "B.": 0.25, "C.": 0.25, "D.": 0.0}
    for seed in range(10):
        lm, judge = tree_backend(tree), ScriptedBackend(["1"])
        algorithm = pf(weighting="score", ess_threshold=1.0, resampling="systematic",
                       scorer=TableScorer(scores, backend=judge))
        result = run(algorithm, lm, Budget(generations=4), seed=seed)
        # weights (0.5, 0.25, 0.25, 0) of 4 particles: systematic gives A 2 copies, B and C one, D none
        assert by_depth(lm) == {0: [4], 1: [2, 1, 1]}
        assert prefixes(lm)[1:] == ["A." + D, "B." + D, "C." + D]
        assert sorted(c.answer for c in result.candidates) == ["1", "2", "3", "4"]
        assert result.spent.generations == 4 and result.spent.continuations == 8
        s = result.search
        assert (s.steps, s.requests, s.scoring_calls, s.round_trips) == (2, 4, 2, 4) and s.width == 4
        assert len(judge.calls) == 2  # one scoring call per search step


def test_finished_particles_are_never_revived():
    tree = {"": ["The answer is 42.", "Think.", "Think.", "Think."],
            "Think.": ["The answer is 42.", "More.", "The answer is 41."], "Think.|More.": ["The answer is 6."]}
    scores = {"The answer is 42.": 0.99, "Think.": 0.5, "More.": 0.5, "The answer is 41.": 0.98}
    for method in RESAMPLING:
        for seed in range(10):
            lm = tree_backend(tree)
            result = run(pf(ess_threshold=1.0, resampling=method, scorer=TableScorer(scores)), lm,
                         Budget(generations=4), seed=seed)
            # the finished particles outweigh the live ones, yet only live ones are drawn
            assert by_depth(lm) == {0: [4], 1: [3], 2: [1]}
            finished = {D.join(c.steps) + D for c in result.candidates}
            assert not finished & set(prefixes(lm))
            assert sorted(c.answer for c in result.candidates) == ["41", "42", "42", "6"]
            assert result.spent.generations == len(result.candidates) == 4


def test_equal_weights_trigger_no_resampling_below_a_threshold_of_one():
    tree = {"": ["A.", "B.", "C.", "D."]}  # four distinct first steps, all scored alike
    ns = {}
    for threshold in (0.5, 1.0):
        ns[threshold] = []
        for seed in range(10):
            lm = tree_backend(tree)
            run(pf(resampling="multinomial", ess_threshold=threshold, scorer=TableScorer({})), lm,
                Budget(generations=4), seed=seed)
            ns[threshold].append(by_depth(lm)[1])
    assert all(n == [1, 1, 1, 1] for n in ns[0.5])  # each particle goes on with its own path
    assert any(max(n) > 1 for n in ns[1.0])  # resampled anyway: some drawn twice, one request of n=2


def test_answer_by_best_weight_or_weighted_vote():
    tree = {"": ["The answer is 5.", "The answer is 5.", "The answer is 5.", "The answer is 9."]}
    scores = {"The answer is 5.": 0.6, "The answer is 9.": 0.7}
    best = run(pf(scorer=TableScorer(scores)), tree_backend(tree), Budget(generations=4))
    assert best.answer == "9" and best.candidates[best.search.chosen].score == 0.7
    vote = run(pf(answer="weighted-vote", scorer=TableScorer(scores)), tree_backend(tree), Budget(generations=4))
    assert vote.answer == "5"
    # three particles of odds 1.5 against one of odds 7/3: normalised weight per answer
    assert vote.distribution == pytest.approx({"5": 4.5 / (4.5 + 7 / 3), "9": (7 / 3) / (4.5 + 7 / 3)})
    assert sorted(c.score for c in vote.candidates) == [0.6, 0.6, 0.6, 0.7]  # their own scores, kept
    assert sorted(c.votes for c in vote.candidates) == [1, 3, 3, 3]


def test_runs_are_deterministic_under_a_seed():
    for algorithm in (pf(resampling="multinomial", ess_threshold=1.0), pg(resampling="multinomial", sweeps=3)):
        outcomes = []
        for _ in range(2):
            lm = ScriptedBackend(random_tree(7))
            scorer = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS})
            algorithm.process_scorer = scorer
            result = run(algorithm, lm, Budget(generations=9), seed=11)
            outcomes.append(([(c.prompt.assistant_prefix, c.params.n, c.params.seed) for c in lm.calls],
                             [c.steps for c in result.candidates], result.answer))
        assert outcomes[0] == outcomes[1]


def test_a_search_needs_a_process_scorer():
    with pytest.raises(ConfigError, match="process scorer"):
        run(ParticleFiltering(), tree_backend(TREE), Budget(generations=2))
    with pytest.raises(ConfigError, match="process scorer"):
        run(ParticleGibbs(), tree_backend(TREE), Budget(generations=2))


def test_options_are_checked_and_built_from_a_search_s_options():
    for bad in ({"resampling": "stratified"}, {"weighting": "odds"}, {"answer": "vote"}, {"ess_threshold": 1.5},
                {"ess_threshold": -0.1}, {"temperature": 0.0}, {"temperature": float("inf")}, {"width": 0},
                {"aggregation": "median"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ParticleFilteringOptions(**bad)
    with pytest.raises(ConfigError, match="sweeps"):
        ParticleGibbsOptions(sweeps=0)
    with pytest.raises(ConfigError, match="resampling"):
        ParticleGibbsOptions(resampling="residual")
    shared = SearchOptions(width=6, aggregation="min", vote=True, steps=StepOptions(max_steps=3))
    built = ParticleGibbsOptions.from_search(shared, sweeps=3, resampling="multinomial")
    assert isinstance(built, ParticleGibbsOptions) and built.sweeps == 3 and built.resampling == "multinomial"
    assert (built.width, built.aggregation, built.answer, built.steps, built.sampling) == \
        (6, "min", "weighted-vote", shared.steps, shared.sampling)
    assert ParticleFilteringOptions.from_search(SearchOptions()).answer == "best"
    assert (ANSWERS, WEIGHTINGS) == (("best", "weighted-vote"), ("logit", "score"))
    out = pg().options_dict()
    assert out["process_scorer"] == "table" and out["sweeps"] == 2 and out["resampling"] == "systematic"


# -- particle Gibbs ---------------------------------------------------------------------------------


def test_gibbs_splits_the_generations_across_sweeps_and_answers_from_all():
    lm = tree_backend(TREE)
    result = run(pg(sweeps=2), lm, Budget(generations=7))
    roots = [c.params.n for c in lm.calls if not c.prompt.assistant_prefix]
    assert roots == [4, 3]  # 7 generations: 4 new particles, then 3 beside the reference
    assert result.spent.generations == len(result.candidates) == 7
    assert result.answer == "42" and result.candidates[result.search.chosen].steps == RIGHT
    # more sweeps than generations: the sweeps with no share are not run
    lm = tree_backend(TREE)
    result = run(pg(sweeps=3), lm, Budget(generations=2))
    assert [c.params.n for c in lm.calls if not c.prompt.assistant_prefix] == [1, 1]
    assert result.spent.generations == len(result.candidates) == 2


def _two_starts(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str:
    """The first sweep's particle starts "Slow start.", the second sweep's "Quick start."; each
    then answers (Slow: 42, Quick: 7)."""
    done = [s for s in prompt.assistant_prefix.split(D) if s]
    if not done:
        return ("Slow start." if call == 0 else "Quick start.") + D + "then"
    return "The answer is 42." if done[0] == "Slow start." else "The answer is 7."


def test_gibbs_reference_competes_by_its_score_at_the_same_step_not_its_final_one():
    options = {"weighting": "score", "ess_threshold": 1.0, "sweeps": 2, "width": 2}
    for seed in range(10):
        # the reference (sweep 1: Slow start, then 42) scored 0 at step 1 but 0.99 at its end:
        # at step 1 of sweep 2 it weighs 0 against the free particle's 0.5, and is never copied
        lm = ScriptedBackend(_two_starts)
        scores = {"Slow start.": 0.0, "The answer is 42.": 0.99, "Quick start.": 0.5, "The answer is 7.": 0.5}
        result = run(pg(scorer=TableScorer(scores), **options), lm, Budget(generations=2), seed=seed)
        assert prefixes(lm) == ["", "Slow start." + D, "", "Quick start." + D]
        assert sorted(c.answer for c in result.candidates) == ["42", "7"] and result.answer == "42"
        # the other way round: strong at step 1, worthless at its end; the free particle weighs 0
        # at step 1 and becomes a copy of the reference's first step, continued as a new particle
        lm = ScriptedBackend(_two_starts)
        scores = {"Slow start.": 1.0, "The answer is 42.": 0.0, "Quick start.": 0.0}
        result = run(pg(scorer=TableScorer(scores), **options), lm, Budget(generations=2), seed=seed)
        assert prefixes(lm) == ["", "Slow start." + D, "", "Slow start." + D]
        assert [c.steps for c in result.candidates] == [("Slow start.", "The answer is 42.")] * 2
        # the reference itself costs nothing: two generations, two candidates
        assert result.spent.generations == len(result.candidates) == 2


def test_gibbs_reference_never_competes_with_its_finished_path():
    # the reference is one step long (it answered at once): no prefix of it before its last step,
    # so sweep 2 is a plain particle filter, however well the reference scored
    def reply(prompt, params, call, i):
        if prompt.assistant_prefix:
            return "The answer is 7."
        return "The answer is 42." if call == 0 else "Quick start." + D + "then"

    scores = {"The answer is 42.": 0.99, "Quick start.": 0.01}
    for seed in range(5):
        lm = ScriptedBackend(reply)
        result = run(pg(ess_threshold=1.0, sweeps=2, width=2, scorer=TableScorer(scores)), lm,
                     Budget(generations=2), seed=seed)
        assert prefixes(lm) == ["", "", "Quick start." + D]
        assert sorted(c.answer for c in result.candidates) == ["42", "7"]


# -- the budget ------------------------------------------------------------------------------------


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=budgets(),
    gibbs=st.booleans(),
    sweeps=st.integers(1, 3),
    resampling=st.sampled_from(RESAMPLING),
    ess_threshold=st.sampled_from([0.0, 0.5, 1.0]),
    weighting=st.sampled_from(WEIGHTINGS),
    answer=st.sampled_from(ANSWERS),
    salt=st.integers(0, 10_000),
    width=st.one_of(st.none(), st.integers(1, 8)),
    native_n=st.booleans(),
    charged_scorer=st.booleans(),
    every_tokens=st.one_of(st.none(), st.integers(1, 4)),
    max_tokens=st.integers(2, 30),
    max_steps=st.integers(1, 5),
)
def test_no_limit_is_ever_exceeded_and_every_candidate_is_one_generation(
        budget, gibbs, sweeps, resampling, ess_threshold, weighting, answer, salt, width, native_n, charged_scorer,
        every_tokens, max_tokens, max_steps):
    price = Price(1.0, 2.0)
    lm = ScriptedBackend(random_tree(salt), native_n=native_n, price=price)
    judge = ScriptedBackend(["1"], price=price) if charged_scorer else None
    scorer = TableScorer({t: (zlib.crc32(t.encode()) % 100) / 100 for t in STEP_TEXTS}, backend=judge)
    common = {"sampling": SamplingOptions(max_tokens=max_tokens, min_tokens=1),
              "steps": StepOptions(every_tokens=every_tokens, max_steps=max_steps, max_step_tokens=6),
              "width": width, "resampling": resampling, "ess_threshold": ess_threshold, "weighting": weighting,
              "answer": answer}
    algorithm = (ParticleGibbs(ParticleGibbsOptions(**common, sweeps=sweeps), process_scorer=scorer) if gibbs
                 else ParticleFiltering(ParticleFilteringOptions(**common), process_scorer=scorer))
    ledger = Ledger(budget)
    result = asyncio.run(algorithm.run(lm, QUESTION, ledger, seed=3))
    check_search_within_budget(result, ledger, budget, search_width(budget, width), lm, max_steps)
