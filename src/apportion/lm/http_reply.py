"""Reading an OpenAI-compatible reply without trusting it: choices, log-probabilities, usage.

What a server reports is charged; what it leaves out is bounded from above, never guessed low.
A sample's tokens are counted exactly from its log-probabilities (one per token) where the
server sent them. Otherwise, without usage, a sample is charged ``max_tokens`` where it says it
hit the limit, and else the fewest of ``max_tokens`` and its UTF-8 bytes plus the longest stop
string plus one (a byte-level token decodes to at least one byte; the stop string and the
end-of-sequence token were generated but are not in the text). A server that ignores
``max_tokens`` and also sends neither usage nor log-probabilities cannot be caught. Prompt tokens
the server says it served from its prefix cache are read into ``Usage.cached_input_tokens``
(charged at the cached input price), never more than the prompt tokens it reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

from apportion._slots import slot_builder
from apportion.budget.units import Usage
from apportion.lm.base import Sample, SamplingParams

# Token counts above this in a reply are nonsense (the largest contexts are a few million tokens).
_MAX_REPORTED = 10**9


@dataclass(frozen=True, slots=True)
class Reply:
    samples: tuple[Sample, ...]
    """Every choice the server sent, in index order (more or fewer than asked, possibly)."""
    usage: Usage
    """What the server generated for all of them, reported or bounded (``estimated``)."""
    notes: tuple[str, ...] = ()


def read_reply(data: dict[str, Any], params: SamplingParams, prompt_bound: int) -> Reply:
    """``data`` is a parsed 200 body with a ``choices`` list; ``prompt_bound`` the prompt tokens
    reserved for the request (charged when the server reports none)."""
    notes: list[str] = []
    choices = [c for c in data["choices"] if isinstance(c, dict)]
    if len(choices) < len(data["choices"]):
        notes.append(f"{len(data['choices']) - len(choices)} choice(s) were not JSON objects: ignored")
    indices = [c.get("index") for c in choices]
    if indices != list(range(len(choices))) or set(map(type, indices)) != _INTS:  # most servers send them in order
        choices.sort(key=_index)
    samples = [_sample(c, params.top_logprobs) for c in choices]
    usage_raw = data.get("usage") if isinstance(data.get("usage"), dict) else None
    prompt_tokens = _int(usage_raw, "prompt_tokens")
    completion_tokens = _int(usage_raw, "completion_tokens")
    estimated = prompt_tokens is None or completion_tokens is None
    counted = sum(s.output_tokens for s in samples)
    if completion_tokens is None:
        completion_tokens = sum(s.output_tokens or _upper_bound(c, s, params) for c, s in zip(choices, samples))
    elif counted > completion_tokens:
        notes.append(f"server reported {completion_tokens} completion tokens but sent log-probabilities "
                     f"for {counted}: charged {counted}")
        completion_tokens = counted
    if estimated:
        notes.append("server reported no usage: token counts bounded from above (estimated)")
    input_tokens = prompt_bound if prompt_tokens is None else prompt_tokens
    cached = _cached_tokens(usage_raw, prompt_tokens, notes)
    usage = Usage(len(samples), input_tokens, completion_tokens, estimated,
                  cached_input_tokens=cached)
    return Reply(tuple(_spread_tokens(samples, completion_tokens)), usage, tuple(notes))


def _cached_tokens(usage: dict[str, Any] | None, prompt_tokens: int | None, notes: list[str]) -> int:
    """The prompt tokens the server says it served from its prefix cache
    (``usage.prompt_tokens_details.cached_tokens``, as OpenAI, vLLM and llama.cpp's server send it),
    charged at the cached input price. Only a part of a reported prompt count can be cached: none
    where the server reported no prompt tokens (the prompt is then charged its reserved bound at the
    full price), and a count above the prompt's is cut to it."""
    details = usage.get("prompt_tokens_details") if usage is not None else None
    if not isinstance(details, dict):
        return 0
    cached = _int(details, "cached_tokens")
    if not cached or prompt_tokens is None or cached != details["cached_tokens"]:
        return 0  # none, not a count (a fraction is not a number of tokens), or nothing to part
    if cached > prompt_tokens:
        notes.append(f"server reported {cached} cached prompt tokens of {prompt_tokens}: "
                     f"counted {prompt_tokens} cached")
        return prompt_tokens
    return cached


def _index(choice: dict[str, Any]) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else 0


def _sample(choice: dict[str, Any], top_k: int) -> Sample:
    logprobs = _choice_logprobs(choice)
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    confidences = _choice_confidences(choice, top_k) if top_k else None
    return _build_sample(_choice_text(choice), finish, len(logprobs) if logprobs else 0, logprobs,  # type: ignore[no-any-return]
                         confidences, _hidden_text(choice) or None)


_build_sample = slot_builder(Sample)  # one per choice (``apportion._slots``)


def _choice_confidences(choice: dict[str, Any], top_k: int) -> tuple[float, ...] | None:
    """Per-token confidence, minus the mean of the ``top_k`` best log-probabilities, from the
    chat format's ``top_logprobs`` lists or the legacy format's ``top_logprobs`` dicts. None
    unless every token came with the alternatives asked for (a server that sends fewer is not
    measuring the same thing)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list):
        tops = [[a.get("logprob") for a in t.get("top_logprobs") or () if isinstance(a, dict)]
                if isinstance(t, dict) else [] for t in content]
    else:
        raw = lp.get("top_logprobs")
        tops = [list(t.values()) if isinstance(t, dict) else [] for t in raw] if isinstance(raw, list) else []
    out = []
    for values in tops:
        best = sorted((float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v)), reverse=True)[:top_k]
        if len(best) < top_k:
            return None
        out.append(-math.fsum(best) / top_k)
    return tuple(out) or None


def _choice_text(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else choice.get("text")
    return content if isinstance(content, str) else ""


def _hidden_text(choice: dict[str, Any]) -> str:
    """Reasoning a server returns beside the answer (vLLM's ``reasoning_content``): generated,
    billed, not part of the sample's text."""
    message = choice.get("message")
    if not isinstance(message, dict) or ("reasoning_content" not in message and "reasoning" not in message):
        return ""
    parts = [message.get(k) for k in ("reasoning_content", "reasoning")]
    return "".join(p for p in parts if isinstance(p, str))


def _choice_logprobs(choice: dict[str, Any]) -> tuple[float, ...] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    # Fast paths where every entry is a plain dict and every value a float (what servers send): the
    # same values as the general expressions, without a Python-level step per token.
    values: Sequence[Any]
    if isinstance(content, list):  # chat format
        try:  # dict.get refuses anything but a dict: no separate pass to check the entries' types
            values = tuple(map(dict.get, content, repeat("logprob")))
        except TypeError:
            values = [t.get("logprob") for t in content if isinstance(t, dict)]
    else:  # legacy completions format
        raw = lp.get("token_logprobs")
        values = raw if isinstance(raw, list) else []
    if set(map(type, values)) == _FLOATS:
        return tuple(values)
    clean = tuple(float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    return clean or None


_INTS = {int}
_FLOATS = {float}


def _upper_bound(choice: dict[str, Any], sample: Sample, params: SamplingParams) -> int:
    if sample.finish_reason == "length":
        return params.max_tokens
    stop = max((len(s.encode()) for s in params.stop), default=0)
    text_bytes = len(sample.text.encode()) + len((sample.reasoning or "").encode())
    return min(params.max_tokens, text_bytes + stop + 1)


def _spread_tokens(samples: list[Sample], total: int) -> list[Sample]:
    """Per-sample token counts: from logprobs where given, the rest of the total shared out by
    text length."""
    unknown = [s for s in samples if not s.output_tokens]
    if not unknown:
        return samples
    left = max(0, total - sum(s.output_tokens for s in samples))
    weights = [max(1, len(s.text)) for s in unknown]
    shares = [left * w // sum(weights) for w in weights]
    shares[-1] += left - sum(shares)
    it = iter(shares)
    return [s if s.output_tokens else replace(s, output_tokens=next(it)) for s in samples]


def _int(d: dict[str, Any] | None, key: str) -> int | None:
    if d is None:
        return None
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if not 0 <= v <= _MAX_REPORTED:
        return None  # a count no request could have: not usage, so bounded like missing usage
    return math.ceil(v)
