"""The numpy sampler must be exactly temperature-then-nucleus sampling, whatever shortcut it takes."""

import numpy as np
import pytest

from apportion.lm.sampling import sample_token


def reference(logits, temperature, top_p):
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.searchsorted(np.cumsum(p[order]), top_p, side="left") + 1
    q = np.zeros_like(p)
    q[order[:keep]] = p[order[:keep]]
    return q / q.sum()


def empirical(logits, temperature, top_p, draws):
    counts = np.zeros(len(logits))
    rng = np.random.default_rng(1)
    for _ in range(draws):
        token, _, _ = sample_token(logits, temperature, top_p, rng, want_logprob=False)
        counts[token] += 1
    return counts / draws


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.8, 0.95)])
def test_empirical_distribution_matches_reference(temperature, top_p):
    logits = np.random.default_rng(0).normal(0, 3.0, size=400).astype(np.float32)
    expected = reference(logits.astype(np.float64), temperature, top_p)
    observed = empirical(logits, temperature, top_p, 20_000)
    assert observed[expected == 0].sum() == 0  # nothing outside the nucleus, ever
    assert 0.5 * np.abs(observed - expected).sum() < 0.05


def test_heavy_tail_falls_back_to_the_full_sort():
    # ten likely tokens hold 10% of the mass; 200,000 tokens each below the candidate floor hold
    # the rest, so the nucleus for top_p=0.5 must reach deep into the tail
    logits = np.full(200_010, 0.0, dtype=np.float32)
    logits[:10] = np.log(0.1 / 10 * 200_000 / 0.9)
    expected = reference(logits.astype(np.float64), 1.0, 0.5)
    observed = empirical(logits, 1.0, 0.5, 3_000)
    assert observed[expected == 0].sum() == 0
    assert abs(observed[:10].sum() - expected[:10].sum()) < 0.05


def test_greedy_and_logprob_are_untempered():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    token, lp, _ = sample_token(logits, 0.0, 1.0, np.random.default_rng(0), want_logprob=True)
    assert token == 1
    assert lp == pytest.approx(3.0 - np.log(np.exp(logits).sum()), abs=1e-5)
    _, lp_hot, _ = sample_token(logits, 2.0, 1.0, np.random.default_rng(0), want_logprob=True)
    assert lp_hot <= 0


def test_same_seed_same_tokens():
    logits = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    a = [sample_token(logits, 0.8, 0.95, rng, False)[0] for rng in [np.random.default_rng(9)] for _ in range(50)]
    b = [sample_token(logits, 0.8, 0.95, rng, False)[0] for rng in [np.random.default_rng(9)] for _ in range(50)]
    assert a == b


def test_token_confidence_is_minus_mean_top_k_logprob():
    logits = np.array([0.0, 2.0, 1.0, -1.0, 0.5], dtype=np.float32)
    logp = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    for temperature in (0.0, 0.7, 1.0):
        _, _, conf = sample_token(logits, temperature, 1.0, np.random.default_rng(0), False, top_k=3)
        assert conf == pytest.approx(-np.sort(logp)[-3:].mean(), abs=1e-5)
    # a peaked distribution is more confident than a flat one
    _, _, flat = sample_token(np.zeros(50, dtype=np.float32), 1.0, 1.0, np.random.default_rng(0), False, 5)
    peaked = np.zeros(50, dtype=np.float32)
    peaked[7] = 8
    _, _, sharp = sample_token(peaked, 1.0, 1.0, np.random.default_rng(0), False, 5)
    assert sharp > flat
