"""How fast the embedded backend samples, and what the engine adds on top of it.

Figures, each the median over interleaved repeats (interleaving spreads the drift of a shared
machine over every configuration alike):
- tokens per second for one request of n=1 and of n=8 at natural lengths (generation stops at
  end-of-sequence, so the batch thins out as samples finish), and at fixed lengths (every sample
  runs to max_tokens: the batching gain itself);
- the wall time per output token of self-consistency with a budget of 8 divided by that of one
  bare backend request of n=8 with the same seed: what the engine's reservation, extraction and
  voting cost. The samples are the same up to llama.cpp's batched arithmetic (the bare request
  finds the prompt in the prefix cache, so its logits are computed in other batches and a
  near-tie can part a sample), hence per token;
- continuous batching: 8 requests of n=1 on 8 distinct questions sent at once, against the same
  8 sent one after another, at fixed output lengths (``concurrent8_over_sequential``), and
  against one n=8 request (the batch-decode limit);
- shared prefixes: 8 continuations of one shared prefix of ``prefix_tokens`` tokens sent at once,
  against 8 independent prompts of the same length, at one output token (so the time is the
  prefill's: ``shared_prefix_prefill_speedup``) and at fixed output lengths. Every repeat uses
  new prompt text, so nothing is served from an earlier repeat's prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, SamplingOptions
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.budget.units import Budget
from apportion.lm.base import Backend, Prompt, SamplingParams

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep does he have now?"


@dataclass(frozen=True, slots=True)
class ThroughputConfig:
    repeats: int = 3
    max_tokens: int = 256
    seed: int = 0
    prefix_tokens: int = 300
    concurrent_tokens: int = 128
    """Fixed output length of each request in the concurrency and shared-prefix rows."""


_WORDS = (
    "river", "stone", "market", "lantern", "harvest", "copper", "meadow", "signal", "orchard",
    "canvas", "engine", "ledger", "thunder", "velvet", "compass", "garden", "harbor", "pepper",
    "silver", "window", "ladder", "marble", "forest", "candle", "planet", "basket", "violin",
    "desert", "mirror", "rocket", "island",
)


def _paragraph(rng: random.Random, tokens: int, count: Callable[[str], int]) -> str:
    """Prose of at least ``tokens`` tokens, new words each call (no cache can hold it yet)."""
    words: list[str] = [f"Record {rng.randrange(10**9)}."]
    while count(" ".join(words)) < tokens:
        words += [rng.choice(_WORDS) for _ in range(8)] + [f"{rng.randrange(1000)}."]
    return " ".join(words)


async def measure(lm: Backend, config: ThroughputConfig) -> dict[str, Any]:
    prompt = Prompt.chat(QUESTION, system=DEFAULT_SYSTEM_PROMPT)
    await lm.generate(prompt, SamplingParams(n=2, max_tokens=4))  # load and warm up
    runs: dict[str, list[dict[str, float]]] = {}

    async def timed(name: str, params: SamplingParams) -> None:
        started = time.perf_counter()
        completion = await lm.generate(prompt, params)
        wall = time.perf_counter() - started
        tokens = completion.usage.output_tokens
        runs.setdefault(name, []).append({"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall})

    async def together(name: str, prompts: list[Prompt], params: SamplingParams, concurrent: bool) -> None:
        started = time.perf_counter()
        if concurrent:
            done = await asyncio.gather(*(lm.generate(p, replace(params, seed=(params.seed or 0) + i))
                                          for i, p in enumerate(prompts)))
        else:
            done = [await lm.generate(p, replace(params, seed=(params.seed or 0) + i)) for i, p in enumerate(prompts)]
        wall = time.perf_counter() - started
        tokens = sum(c.usage.output_tokens for c in done)
        cached = sum(c.usage.cached_input_tokens for c in done)
        runs.setdefault(name, []).append({"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
                                          "input_tokens": sum(c.usage.input_tokens for c in done),
                                          "cached_input_tokens": cached})

    count = _token_counter(lm)
    rng = random.Random(config.seed)
    questions = [Prompt.chat(q, system=DEFAULT_SYSTEM_PROMPT) for q in CONCURRENT_QUESTIONS]
    sc = SelfConsistency(SelfConsistencyOptions(SamplingOptions(max_tokens=config.max_tokens)))
    for rep in range(config.repeats):
        seed = config.seed + 1000 * rep
        base = SamplingParams(max_tokens=config.max_tokens, temperature=0.8, top_p=0.95, seed=seed,
                              logprobs=True)
        for n in (1, 8):
            await timed(f"n={n}", replace(base, n=n))
            await timed(f"n={n} fixed length", replace(base, n=n, ignore_eos=True))
        started = time.perf_counter()
        result = await sc.run(lm, QUESTION, Budget(generations=8), seed=seed)
        sc_wall = time.perf_counter() - started
        await timed("bare n=8 (the same seeds as self-consistency)", replace(base, n=8))
        bare = runs["bare n=8 (the same seeds as self-consistency)"][-1]
        sc_tokens = result.spent.output_tokens
        runs.setdefault("self-consistency budget 8", []).append(
            {"tokens": sc_tokens, "seconds": sc_wall, "tokens_per_s": sc_tokens / sc_wall,
             "ratio_to_bare": (sc_wall / sc_tokens) / (bare["seconds"] / bare["tokens"])})
        fixed = replace(base, max_tokens=config.concurrent_tokens, ignore_eos=True, logprobs=False)
        await together(SEQUENTIAL, questions, fixed, concurrent=False)
        await together(CONCURRENT, questions, fixed, concurrent=True)
        await timed(ONE_N8, replace(fixed, n=8))
        def fresh() -> tuple[list[Prompt], list[Prompt]]:
            """8 paths continuing one new prefix, and 8 new prompts of the same length."""
            shared = _paragraph(rng, config.prefix_tokens, count)
            return ([Prompt.raw(f"{shared}\nPath {i + 1}:") for i in range(8)],
                    [Prompt.raw(f"{_paragraph(rng, config.prefix_tokens, count)}\nPath {i + 1}:")
                     for i in range(8)])

        for suffix, params in ((" prefill", replace(fixed, max_tokens=1)), ("", fixed)):
            paths, alone = fresh()
            await together(INDEPENDENT + suffix, alone, params, concurrent=True)
            await together(SHARED + suffix, paths, params, concurrent=True)
    summary = {name: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "median_seconds": statistics.median(r["seconds"] for r in rs),
                      "mean_tokens": statistics.mean(r["tokens"] for r in rs)} for name, rs in runs.items()}
    summary["ratios"] = {
        "n8_over_n1_tokens_per_s": summary["n=8"]["median_tokens_per_s"] / summary["n=1"]["median_tokens_per_s"],
        "n8_over_n1_fixed_length": summary["n=8 fixed length"]["median_tokens_per_s"]
        / summary["n=1 fixed length"]["median_tokens_per_s"],
        "self_consistency_over_bare_per_token": statistics.median(
            r["ratio_to_bare"] for r in runs["self-consistency budget 8"]),
        "concurrent8_over_sequential": _paired(runs[CONCURRENT], runs[SEQUENTIAL], "tokens_per_s"),
        "concurrent8_over_one_n8": _paired(runs[CONCURRENT], runs[ONE_N8], "tokens_per_s"),
        "shared_prefix_prefill_speedup": _paired(runs[INDEPENDENT + " prefill"], runs[SHARED + " prefill"], "seconds"),
        "shared_prefix_wall_speedup": _paired(runs[INDEPENDENT], runs[SHARED], "seconds"),
    }
    stats = getattr(lm, "stats", None)
    engine = stats.to_dict() if stats is not None else None
    return {"config": asdict(config), "model": lm.model, "backend": lm.name, "runs": runs, "summary": summary,
            "engine": engine}


SEQUENTIAL = "8 requests n=1, one after another (fixed length)"
CONCURRENT = "8 requests n=1, concurrent (fixed length)"
ONE_N8 = "1 request n=8 (fixed length)"
INDEPENDENT = "8 independent prompts"
SHARED = "8 continuations of one shared prefix"
CONCURRENT_QUESTIONS = (
    "A farmer has 17 sheep and buys 25 more. How many sheep does he have now?",
    "Tom had 48 marbles and gave 19 to his sister. How many marbles does Tom have left?",
    "A baker makes 12 trays of 24 cookies. How many cookies is that?",
    "Anna reads 35 pages a day. How many pages does she read in 6 days?",
    "A bus carries 52 people and 17 get off. How many people are still on the bus?",
    "There are 96 apples shared equally among 8 baskets. How many apples are in each basket?",
    "Sam saved 125 dollars and spent 48. How much money does he have left?",
    "A garden has 14 rows of 9 tulips. How many tulips are there?",
)


def _paired(numerator: list[dict[str, float]], denominator: list[dict[str, float]], key: str) -> float:
    """The median over repeats of each repeat's ratio (both measured back to back, so a burst of
    the host's steal time hits both sides of one ratio)."""
    return statistics.median(n[key] / d[key] for n, d in zip(numerator, denominator, strict=True))


def _token_counter(lm: Backend) -> Callable[[str], int]:
    from apportion.lm.llama_embedded import embedded_tokenizer

    path = getattr(getattr(lm, "options", None), "model_path", None)
    return embedded_tokenizer(path).count


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
