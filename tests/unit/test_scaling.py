"""Scaling laws: fits recover known parameters, say how far they can be trusted, and warn when
asked beyond what was measured."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apportion.allocate import FitCache, ScalingLaw, fit, fit_law
from apportion.errors import ConfigError

SPENDS = [1, 2, 4, 8, 16, 32]


def curve(a, b, c, spends=SPENDS):
    return [a * n**b + c for n in spends]


def test_recovers_a_saturating_curve_exactly():
    law = fit_law(SPENDS, curve(-0.4, -0.7, 0.85))
    assert (law.a, law.b, law.c) == pytest.approx((-0.4, -0.7, 0.85), abs=1e-4)
    assert law.rmse < 1e-6 and law.ceiling == pytest.approx(0.85, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(a=st.floats(-0.8, -0.05), b=st.floats(-2.5, -0.1), c=st.floats(0.3, 1.0))
def test_recovers_known_parameters(a, b, c):
    law = fit_law(SPENDS, curve(a, b, c))
    # the curve is recovered wherever it was measured, whatever the parameters' trade-offs
    for n in SPENDS:
        assert law.value(n) == pytest.approx(a * n**b + c, abs=1e-4)


def test_noisy_points_give_intervals_that_cover_the_truth():
    rng = np.random.default_rng(0)
    truth = dict(a=-0.5, b=-0.6, c=0.8)
    # 400 questions, each right at spend n with the law's probability
    per_question = (rng.random((400, len(SPENDS))) < np.array(curve(**truth))).astype(float)
    fitted = fit(SPENDS, per_question=per_question, bootstrap=200, seed=1)
    for name, value in truth.items():  # each parameter's interval covers it (c, the ceiling, widely:
        low, high = fitted.intervals[name]  # 32 samples do not pin down where a curve flattens)
        assert low <= value <= high
    assert fitted.loo_error is not None and fitted.loo_error < 0.05
    assert fitted.extrapolation_error is not None and fitted.extrapolation_error < 0.08
    lo, hi = fitted.interval_at(64, per_question, SPENDS, draws=100)
    assert lo <= truth["a"] * 64 ** truth["b"] + truth["c"] <= hi


def test_predictions_beyond_the_measured_range_are_flagged():
    law = fit_law(SPENDS, curve(-0.4, -0.7, 0.85))
    inside, outside = law.predict(10), law.predict(100)
    assert not inside.extrapolated and outside.extrapolated
    assert "outside the measured range [1, 32]" in outside.warnings[0]
    assert law.predict(0.5).extrapolated


def test_budget_for_a_target_inverts_the_law_and_refuses_the_unreachable():
    law = ScalingLaw(-0.4, -0.7, 0.85, 1, 32)
    needed = law.budget_for(0.8)
    assert needed is not None and law.value(needed.spend) == pytest.approx(0.8)
    assert needed.spend == pytest.approx((0.05 / 0.4) ** (1 / -0.7)) and not needed.extrapolated  # 19.5
    assert law.budget_for(0.84).extrapolated  # 0.84 needs about 466
    assert law.budget_for(0.9) is None  # above the ceiling of 0.85


def test_bad_input_is_named():
    with pytest.raises(ConfigError, match="three distinct spends"):
        fit_law([1, 2, 2], [0.1, 0.2, 0.2])
    with pytest.raises(ConfigError, match="positive"):
        fit_law([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="per spend"):
        fit(SPENDS, per_question=[[1, 0]], bootstrap=5)
    with pytest.raises(ConfigError, match="positive"):
        ScalingLaw(-0.4, -0.7, 0.85, 1, 32).predict(0)


def test_fits_are_cached_per_model_task_algorithm_and_unit(tmp_path):
    cache = FitCache(tmp_path / "laws.json")
    assert cache.get("qwen", "mawps", "self-consistency", "generations") is None
    fitted = fit(SPENDS, curve(-0.4, -0.7, 0.85))
    cache.put("qwen", "mawps", "self-consistency", "generations", fitted)
    again = FitCache(tmp_path / "laws.json").get("qwen", "mawps", "self-consistency", "generations")
    assert again == fitted.law
    assert cache.get("qwen", "mawps", "self-consistency", "tokens") is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a scaling-law cache"):
        FitCache(tmp_path / "bad.json").get("m", "t", "a", "u")


def test_the_flat_curve_fits_a_constant():
    law = fit_law(SPENDS, [0.3] * len(SPENDS))
    assert all(math.isclose(law.value(n), 0.3, abs_tol=1e-9) for n in SPENDS)


def _results(tmp_path, law=(-0.5, -0.8, 0.9), budgets=(1, 2, 4, 8, 16), questions=40):
    import json

    rows = []
    for b in budgets:
        p = law[0] * b ** law[1] + law[2]
        for q in range(questions):
            rows.append({"system": "apportion", "algorithm": "self-consistency", "scorer": None, "budget": b,
                         "question_id": str(q), "right": p, "output_tokens": 50.0 * b, "error": None})
            # a stop row at the full budget: not part of the uniform curve
            rows.append({"system": "apportion", "algorithm": "self-consistency --stop esc:window=2", "scorer": None,
                         "budget": b, "question_id": str(q), "right": 1.0, "output_tokens": 10.0, "error": None})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"model": "m", "dataset": "d"}))
    return tmp_path


def test_a_runs_uniform_curves_are_fitted_per_generation_and_per_token(tmp_path):
    from apportion.bench.fit import fit_run, save

    run = _results(tmp_path)
    fits = fit_run(run, target=0.85, bootstrap=20)
    assert [(f.algorithm, f.unit) for f in fits] == [("apportion: self-consistency", "generations"),
                                                     ("apportion: self-consistency", "output tokens")]
    by_gen = fits[0].fit.law
    assert (by_gen.a, by_gen.b, by_gen.c) == pytest.approx((-0.5, -0.8, 0.9), abs=1e-3)
    assert fits[0].beyond.extrapolated and fits[0].beyond.spend == 32
    assert fits[0].target is not None and fits[0].target.spend == pytest.approx((0.05 / 0.5) ** (1 / -0.8), rel=1e-3)
    assert fits[1].spends == (50, 100, 200, 400, 800)
    out = save(run, fits, cache=tmp_path / "laws.json")
    assert out.name == "fits.json"
    assert FitCache(tmp_path / "laws.json").get("m", "d", "apportion: self-consistency", "generations") == by_gen


def test_a_run_without_three_budgets_is_refused(tmp_path):
    from apportion.bench.fit import fit_run

    with pytest.raises(ConfigError, match="no curve with three or more budgets"):
        fit_run(_results(tmp_path, budgets=(1, 2)))
    with pytest.raises(ConfigError, match=r"no results\.jsonl"):
        fit_run(tmp_path / "nowhere")
