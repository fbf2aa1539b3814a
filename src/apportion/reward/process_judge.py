"""LLM-as-judge process scorer: a model (the policy model or another) says whether the last step
of a prefix is right, given the question and the steps before it.

Two ways to read a score, chosen per backend (``mode="auto"``):

- "verdict" (the backend returns log-probabilities): the judge is asked for Yes or No and the
  score is the probability of Yes. Backends expose the sampled tokens' log-probabilities, not the
  alternatives, so it is read from the first token's log-probability lp, which is the verdict's
  when the reply opens with it: P(yes) = exp(lp) if it said Yes, 1 - exp(lp) if No (two-way
  verdict; mass on other words counts against the verdict given). A reply without
  log-probabilities, or that opens otherwise, is parsed (Yes 1, No 0, else a rating).
- "rating" (no log-probabilities): the judge rates the step from 1 to ``scale`` and the number
  is parsed as ``LLMJudge``'s are (``parse_judge_score``).

Cost: one request per new prefix (``samples`` replies each, averaged), all of one call's requests
concurrently, through ``lm.scorer(backend)``: reserved and settled in the run's ledger as scoring
(tokens, dollars, time; scorer generations, never answers). Prefixes seen before come from the
cache. An unreadable reply is a definite "no score" (None, cached: asking again at temperature 0
would give it again); a refused or failed request is not cached.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.reward.judge import parse_judge_score, parse_verdict
from apportion.reward.process import PrefixOutcome, PrefixScoreCache, Steps, score_paths

JUDGE_MODES = ("auto", "verdict", "rating")
DEFAULT_STEP_SYSTEM = "You are a strict grader of step-by-step solutions."
DEFAULT_VERDICT_TEMPLATE = (
    "Problem:\n{question}\n\nSteps so far:\n{previous}\n\nNew step:\n{step}\n\n"
    "Is the new step correct, given the problem and the steps before it? Answer with one word: Yes or No."
)
DEFAULT_RATING_TEMPLATE = (
    "Problem:\n{question}\n\nSteps so far:\n{previous}\n\nNew step:\n{step}\n\n"
    "Is the new step correct, given the problem and the steps before it? Rate it from 1 (certainly "
    "wrong) to {scale} (certainly correct). Reply with one line: Score: <number>"
)


@dataclass(frozen=True, slots=True)
class ProcessJudgeOptions:
    mode: str = "auto"
    """"verdict" (P(Yes) from log-probabilities), "rating" (a parsed number), or "auto": verdict
    where the judge's backend declares log-probabilities, else rating."""
    scale: int = 10
    samples: int = 1
    """Replies per prefix (one request with n=samples); their scores are averaged."""
    max_tokens: int = 8
    """Verdict mode needs one token; a rating a few more (``rating_max_tokens``)."""
    rating_max_tokens: int = 32
    temperature: float = 0.0
    system_prompt: str | None = DEFAULT_STEP_SYSTEM
    verdict_template: str = DEFAULT_VERDICT_TEMPLATE
    rating_template: str = DEFAULT_RATING_TEMPLATE
    max_context_chars: int = 6000
    """The steps before the last are cut to their last this many characters."""
    max_concurrency: int = 16
    """Judge requests in flight at once."""

    def __post_init__(self) -> None:
        if self.mode not in JUDGE_MODES:
            raise ConfigError(f"judge mode must be one of {JUDGE_MODES}, got {self.mode!r}")
        if min(self.scale, self.samples, self.max_tokens, self.rating_max_tokens, self.max_concurrency) < 1:
            raise ConfigError("scale, samples, max_tokens, rating_max_tokens and max_concurrency must be >= 1")
        for template in (self.verdict_template, self.rating_template):
            if "{step}" not in template:
                raise ConfigError("a step judge template must contain {step}")


class JudgeProcessScorer:
    """A ``ProcessScorer`` asking a model, through any backend, whether each new step is right."""

    name = "judge-process"

    def __init__(self, backend: Backend | None = None, options: ProcessJudgeOptions | None = None,
                 cache: PrefixScoreCache | None = None) -> None:
        self.backend = backend
        self.options = options or ProcessJudgeOptions()
        self.cache = cache if cache is not None else PrefixScoreCache()

    async def score(self, lm: MeteredLM, question: str,
                    paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        judge = lm.scorer(self.backend)
        verdict = self.options.mode == "verdict" or (
            self.options.mode == "auto" and judge.backend.capabilities.logprobs)
        limit = asyncio.Semaphore(self.options.max_concurrency)

        async def one(prefix: Steps) -> float | None:
            async with limit:
                return await self._judge(judge, question, prefix, verdict)

        async def score_new(prefixes: list[Steps]) -> Mapping[Steps, PrefixOutcome]:
            outcomes = await asyncio.gather(*(one(p) for p in prefixes), return_exceptions=True)
            for outcome in outcomes:  # cancellation is not a failure to record
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
            return dict(zip(prefixes, outcomes))

        return await score_paths(self.cache, question, paths, score_new, scorer=f"step judge ({judge.backend.model})")

    def prompt(self, question: str, steps: Sequence[str], verdict: bool) -> Prompt:
        o = self.options
        previous = "\n".join(f"Step {i}: {s.strip()}" for i, s in enumerate(steps[:-1], 1))
        previous = previous[-o.max_context_chars:] if previous else "(none: this is the first step)"
        template = o.verdict_template if verdict else o.rating_template
        content = template.format(question=question, previous=previous,
                                  step=f"Step {len(steps)}: {steps[-1].strip()}", scale=o.scale)
        return Prompt.chat(content, system=o.system_prompt)

    async def _judge(self, judge: MeteredLM, question: str, steps: Steps, verdict: bool) -> float | None:
        o = self.options
        params = SamplingParams(n=o.samples, max_tokens=o.max_tokens if verdict else o.rating_max_tokens,
                                temperature=o.temperature, logprobs=verdict)
        completion = await judge.generate(self.prompt(question, steps, verdict), params, min_tokens=1)
        values = [v for s in completion.samples if (v := read_verdict(s, o.scale)) is not None]
        return math.fsum(values) / len(values) if values else None


def read_verdict(sample: Sample, scale: int = 10) -> float | None:
    """The probability that the judged step is right, from one reply (see the module): P(Yes) from
    the first token's log-probability where the reply opens with its verdict, else the verdict
    as 1 or 0, else a rating out of ``scale``; None where the reply holds none of these."""
    said = parse_verdict(sample.text, strict=True)
    if said is not None and sample.logprobs:
        p = min(1.0, math.exp(sample.logprobs[0]))
        return p if said else 1.0 - p
    said = parse_verdict(sample.text)
    if said is not None:
        return 1.0 if said else 0.0
    return parse_judge_score(sample.text, scale)
