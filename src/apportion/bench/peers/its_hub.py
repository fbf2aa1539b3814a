"""its-hub's own SelfConsistency and BestOfN, pointed at the peer endpoint.

What it is given, so that the comparison is between algorithms: the same messages (our system
prompt and the question), max tokens and temperature, and for self-consistency our answer
extractor as its projection function (its default votes on whole texts, which never agree on
free-form math). BestOfN uses its-hub's own LLMJudge on the same endpoint; llama.cpp rejects
its JSON-schema response format, so that is turned off. Its tie-breaks use the global
``random``, which is seeded per cell.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Hashable, Sequence
from typing import Any

from apportion.algorithms.base import SamplingOptions
from apportion.answers.extract import read_answer
from apportion.banks import Problem
from apportion.errors import ConfigError

ALGORITHMS = {"self-consistency": "SelfConsistency", "best-of-n": "BestOfN"}


def available() -> str | None:
    """None when its-hub can run here, else why not."""
    try:
        import its_hub  # noqa: F401
        from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel  # noqa: F401
    except ImportError as exc:
        return f"its-hub is not installed ({exc}); pip install 'its-hub[lm]'"
    return None


def _project(text: str) -> Hashable:
    return read_answer(text or "")[0]


async def answer(algorithm: str, base_url: str, model: str, problems: Sequence[Problem], budget: int,
                 sampling: SamplingOptions, *, seed: int, concurrency: int) -> list[tuple[str | None, str | None]]:
    """(chosen text, error) per problem, in order."""
    from its_hub import BestOfN, LLMJudge, SelfConsistency
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    if algorithm not in ALGORITHMS:
        raise ConfigError(f"its_hub has no peer for {algorithm!r}; it has: {', '.join(ALGORITHMS)}")
    # max_tries=1: a failing request is a finding to report, not something to retry for seconds.
    lm = OpenAICompatibleLanguageModel(endpoint=base_url, api_key="sk-none", model_name=model,
                                       system_prompt=sampling.system_prompt, max_completion_tokens=sampling.max_tokens,
                                       temperature=sampling.temperature, max_tries=1)
    judge_lm: Any = None
    if algorithm == "self-consistency":
        algo: Any = SelfConsistency(consistency_space_projection_func=_project)
    else:
        judge_lm = OpenAICompatibleLanguageModel(endpoint=base_url, api_key="sk-none", model_name=model,
                                                 max_completion_tokens=64, temperature=0.0, max_tries=1)
        algo = BestOfN(orm=LLMJudge(judge_lm, response_format=None))
    random.seed(seed)
    limit = asyncio.Semaphore(concurrency)

    async def one(problem: Problem) -> tuple[str | None, str | None]:
        async with limit:
            try:
                result = await algo.ainfer(lm, problem.question, budget, return_response_only=False)
            except Exception as exc:  # a peer's failure is data: reported per question, never raised
                return None, f"{type(exc).__name__}: {exc}"
        return (result.the_one or {}).get("content"), None

    try:
        return list(await asyncio.gather(*(one(p) for p in problems)))
    finally:
        for client in (lm, judge_lm):
            close = getattr(client, "close", None)
            if close is not None:
                await close()


def scorer(algorithm: str) -> str | None:
    return "llm-judge" if algorithm == "best-of-n" else None


def fixed_budget(algorithm: str) -> int | None:
    return None


def unwrap(prompt: Any) -> Any:
    return prompt
