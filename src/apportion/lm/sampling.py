"""Token sampling from raw logits: temperature, then nucleus (top-p), as OpenAI-compatible servers
apply them; plus the log-probability of the chosen token under the untempered distribution and,
when asked, DeepConf's token confidence: minus the mean log-probability of the ``top_k`` most
probable tokens (high where the distribution is peaked).

Nucleus sampling needs the most probable tokens in order, but sorting a 49k vocabulary for every
token of every sequence costs more than the rest of the step. The nucleus is almost always among
the few tokens with probability above ``_CANDIDATE_FLOOR``; only those are sorted, and when
their mass falls short of ``top_p`` the whole vocabulary is. The result is exact either way.
"""

from __future__ import annotations

import numpy as np

_CANDIDATE_FLOOR = 1e-5


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                 want_logprob: bool, top_k: int = 0) -> tuple[int, float | None, float | None]:
    """One token id from ``logits`` (1-D float32), its log-probability at temperature 1, and
    (``top_k`` > 0) the token confidence over the ``top_k`` most probable tokens."""
    top = float(logits.max())
    if temperature == 0:
        token = int(logits.argmax())
        weights = None
    else:
        weights = np.exp((logits - top) * np.float32(1.0 / temperature))
        token = _nucleus(weights, top_p, rng) if top_p < 1 else _draw(weights, rng)
    if not (want_logprob or top_k):
        return token, None, None
    unit = weights if (weights is not None and temperature == 1) else np.exp(logits - top)
    log_total = top + float(np.log(unit.sum(dtype=np.float64)))
    confidence = None
    if top_k:
        best = np.partition(logits, len(logits) - top_k)[-top_k:]
        confidence = log_total - float(best.mean(dtype=np.float64))
    return token, (float(logits[token]) - log_total) if want_logprob else None, confidence


def _draw(weights: np.ndarray, rng: np.random.Generator, ids: np.ndarray | None = None) -> int:
    cumulative = np.cumsum(weights, dtype=np.float64)
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    index = min(index, len(weights) - 1)
    return int(ids[index]) if ids is not None else index


def _nucleus(weights: np.ndarray, top_p: float, rng: np.random.Generator) -> int:
    total = float(weights.sum(dtype=np.float64))
    ids = np.flatnonzero(weights > total * _CANDIDATE_FLOOR)
    head = weights[ids]
    if float(head.sum(dtype=np.float64)) < top_p * total:
        ids = np.arange(len(weights))
        head = weights
    order = np.argsort(-head, kind="stable")
    cumulative = np.cumsum(head[order], dtype=np.float64)
    keep = int(np.searchsorted(cumulative, top_p * total, side="left")) + 1
    kept = order[:keep]
    return _draw(head[kept], rng, ids[kept])
