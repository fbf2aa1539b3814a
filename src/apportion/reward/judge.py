"""LLM-as-judge: a model (the policy model or another) rates each candidate solution.

Judge calls are charged to the run's budget (tokens, dollars, time; reported as scorer
generations). Identical texts are judged once. Scores are parsed from free text, tolerant of
the many ways small models phrase a rating; an unparseable reply gives no score, never a guess.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from apportion.errors import BackendError, BudgetExhausted, ConfigError, ScoringFailed
from apportion.lm.base import Backend, Prompt, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate

DEFAULT_JUDGE_SYSTEM = "You are a strict grader of solutions to problems."
DEFAULT_JUDGE_TEMPLATE = (
    "Problem:\n{question}\n\nProposed solution:\n{solution}\n\n"
    "Is the proposed solution correct? Rate it from 1 (certainly wrong) to {scale} "
    "(certainly correct). Reply with one line: Score: <number>"
)


@dataclass(frozen=True, slots=True)
class JudgeOptions:
    scale: int = 10
    samples: int = 1
    """Judge replies per candidate (one request with n=samples); their scores are averaged."""
    max_tokens: int = 48
    temperature: float = 0.0
    system_prompt: str | None = DEFAULT_JUDGE_SYSTEM
    template: str = DEFAULT_JUDGE_TEMPLATE
    max_solution_chars: int = 6000

    def __post_init__(self) -> None:
        if self.scale < 1 or self.samples < 1 or self.max_tokens < 1:
            raise ConfigError("judge scale, samples and max_tokens must be >= 1")
        if "{solution}" not in self.template:
            raise ConfigError("the judge template must contain {solution}")


class LLMJudge:
    name = "judge"
    needs_logprobs = False

    def __init__(self, backend: Backend | None = None, options: JudgeOptions | None = None) -> None:
        self.backend = backend
        self.options = options or JudgeOptions()

    async def score(self, lm: MeteredLM, question: str,
                    candidates: Sequence[Candidate]) -> list[float | None]:
        judge = lm.scorer(self.backend)
        texts = list(dict.fromkeys(c.text for c in candidates))
        # every call is awaited to its end (and settled) before a failure is reported
        outcomes = await asyncio.gather(*(self._judge(judge, question, t) for t in texts), return_exceptions=True)
        by_text = {t: o if not isinstance(o, BaseException) else None for t, o in zip(texts, outcomes)}
        scores = [by_text[c.text] for c in candidates]
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if any(not isinstance(o, BackendError) for o in failed):
            raise next(o for o in failed if not isinstance(o, BackendError))
        if failed:
            raise ScoringFailed(f"judge failed on {len(failed)} of {len(texts)} solutions: {failed[0]}", scores)
        return scores

    async def _judge(self, judge: MeteredLM, question: str, solution: str) -> float | None:
        o = self.options
        content = o.template.format(question=question, solution=solution[-o.max_solution_chars:],
                                    scale=o.scale)
        prompt = Prompt.chat(content, system=o.system_prompt)
        params = SamplingParams(n=o.samples, max_tokens=o.max_tokens, temperature=o.temperature)
        try:
            completion = await judge.generate(prompt, params, min_tokens=min(8, o.max_tokens))
        except BudgetExhausted:
            return None
        values = [v for s in completion.samples if (v := parse_judge_score(s.text, o.scale)) is not None]
        return sum(values) / len(values) if values else None


_SCORE_PATTERNS = (
    re.compile(r"(?:score|rating|grade)\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?", re.I),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(\d+)", re.I),
    re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\b"),
)
_VERDICT = re.compile(r"\b(incorrect|not correct|wrong|correct|right)\b", re.I)


def parse_judge_score(text: str, scale: int = 10) -> float | None:
    """A score in [0, 1] from a judge's reply: "Score: 7", "7/10", "**8**", "Rating - 9 out of
    10", or a bare verdict ("correct" / "incorrect"); None if the reply holds no rating."""
    for pattern in _SCORE_PATTERNS:
        match = pattern.search(text)
        if not match:
            continue
        value = float(match.group(1))
        out_of = float(match.group(2)) if match.lastindex and match.lastindex >= 2 and match.group(2) else float(scale)
        if out_of <= 0:
            continue
        return min(1.0, max(0.0, value / out_of))
    verdict = _VERDICT.search(text)
    if verdict:
        return 0.0 if verdict.group(1).lower() in ("incorrect", "not correct", "wrong") else 1.0
    return None


_LEADING_VERDICT = re.compile(r"^\W*(yes|no|correct|incorrect|right|wrong)\b", re.I)
_POSITIVE = ("yes", "correct", "right")


def parse_verdict(text: str, *, strict: bool = False) -> bool | None:
    """The Yes/No verdict a reply opens with ("Yes", "**No**", "Correct."); None if it opens with
    none. ``strict``: only where the verdict is the reply's very first word, white space aside
    (so that the first token's log-probability is the verdict's)."""
    match = (_STRICT_VERDICT if strict else _LEADING_VERDICT).match(text)
    if not match:
        return None
    return match.group(1).lower() in _POSITIVE


_STRICT_VERDICT = re.compile(r"^\s*(yes|no|correct|incorrect|right|wrong)\b", re.I)

