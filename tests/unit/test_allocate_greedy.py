"""Greedy marginal-gain allocation: optimal by hand and by brute force under concave returns,
never over the budget, and able to cross a flat stretch with lookahead."""

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apportion.allocate import LawModel, PassAtK, ScalingLaw, allocate
from apportion.errors import ConfigError


def test_the_winnable_question_gets_the_samples_and_the_hopeless_one_none():
    # gains per sample: easy 0.9, 0.09, ...; middling 0.5, 0.25, 0.125, ...; hopeless 0.05, 0.0475, ...
    # four samples: easy once (0.9), middling three times (0.5, 0.25, 0.125): 1.775, the best of all splits
    models = [PassAtK(0.9), PassAtK(0.5), PassAtK(0.05)]
    out = allocate(models, [1, 1, 1], 4)
    assert out.samples == (1, 3, 0) and out.expected == pytest.approx(1.775) and out.spent == 4
    assert allocate(models, [1, 1, 1], 4, minimum=1).samples == (1, 2, 1)


def brute_force(models, costs, budget, cap=8):
    best = 0.0
    for ks in itertools.product(range(cap + 1), repeat=len(models)):
        if sum(c * k for c, k in zip(costs, ks)) <= budget + 1e-9:
            best = max(best, sum(m.value(k) for m, k in zip(models, ks)))
    return best


@settings(max_examples=150, deadline=None)
@given(ps=st.lists(st.floats(0.01, 0.99), min_size=1, max_size=3), budget=st.integers(0, 8))
def test_greedy_is_optimal_for_concave_returns_at_equal_cost(ps, budget):
    models = [PassAtK(p) for p in ps]
    out = allocate(models, [1.0] * len(ps), budget, maximum=8)
    assert out.expected == pytest.approx(brute_force(models, [1.0] * len(ps), budget), abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(ps=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
       costs=st.lists(st.floats(0.1, 50), min_size=5, max_size=5), budget=st.floats(0, 300),
       lookahead=st.integers(1, 4))
def test_never_over_the_budget(ps, costs, budget, lookahead):
    costs = costs[: len(ps)]
    out = allocate([PassAtK(p) for p in ps], costs, budget, lookahead=lookahead, maximum=64)
    assert out.spent <= budget + 1e-9
    assert out.spent == pytest.approx(sum(c * k for c, k in zip(costs, out.samples)))


@dataclass(frozen=True)
class Step:
    """Right only once three samples agree: nothing, nothing, then 0.9 (not concave)."""

    def value(self, k: int) -> float:
        return 0.9 if k >= 3 else 0.0


def test_lookahead_crosses_a_flat_stretch_that_plain_greedy_starves():
    models = [Step(), PassAtK(0.2)]
    plain = allocate(models, [1, 1], 3)
    assert plain.samples == (0, 3) and plain.expected == pytest.approx(1 - 0.8**3)  # 0.488
    ahead = allocate(models, [1, 1], 3, lookahead=3)
    assert ahead.samples == (3, 0) and ahead.expected == pytest.approx(0.9)


def test_a_fitted_law_is_a_success_model():
    law = LawModel(ScalingLaw(-0.5, -0.8, 0.9, 1, 16))
    assert law.value(0) == 0 and law.value(1) == pytest.approx(0.4)
    out = allocate([law, PassAtK(0.3)], [1, 1], 6)
    assert sum(out.samples) == 6


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="2 success models for 1 costs"):
        allocate([PassAtK(0.5), PassAtK(0.5)], [1], 4)
    with pytest.raises(ConfigError, match="positive and finite"):
        allocate([PassAtK(0.5)], [0], 4)
    with pytest.raises(ConfigError, match="over the budget"):
        allocate([PassAtK(0.5)] * 3, [2, 2, 2], 5, minimum=1)
