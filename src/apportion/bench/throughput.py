"""How fast the embedded backend samples, and what the engine adds on top of it.

Figures, each the median over interleaved repeats (interleaving spreads the drift of a shared
machine over every configuration alike):
- tokens per second for one request of n=1 and of n=8 at natural lengths (generation stops at
  end-of-sequence, so the batch thins out as samples finish), and at fixed lengths (every sample
  runs to max_tokens: the batching gain itself);
- the wall time of self-consistency with a budget of 8 divided by the wall time of one bare
  backend request of n=8 with the same seed, hence the same samples and tokens: what the
  engine's reservation, extraction and voting cost.
"""

from __future__ import annotations

import json
import statistics
import time
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
        await timed("bare n=8 (same samples as self-consistency)", replace(base, n=8))
        bare = runs["bare n=8 (same samples as self-consistency)"][-1]
        if bare["tokens"] != result.spent.output_tokens:
            raise RuntimeError("the bare request did not reproduce self-consistency's samples")
        runs.setdefault("self-consistency budget 8", []).append(
            {"tokens": result.spent.output_tokens, "seconds": sc_wall, "tokens_per_s": bare["tokens"] / sc_wall,
             "ratio_to_bare": sc_wall / bare["seconds"]})
    summary = {name: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "median_seconds": statistics.median(r["seconds"] for r in rs),
                      "mean_tokens": statistics.mean(r["tokens"] for r in rs)} for name, rs in runs.items()}
    summary["ratios"] = {
        "n8_over_n1_tokens_per_s": summary["n=8"]["median_tokens_per_s"] / summary["n=1"]["median_tokens_per_s"],
        "n8_over_n1_fixed_length": summary["n=8 fixed length"]["median_tokens_per_s"]
        / summary["n=1 fixed length"]["median_tokens_per_s"],
        "self_consistency_over_bare_wall": statistics.median(
            r["ratio_to_bare"] for r in runs["self-consistency budget 8"]),
    }
    return {"config": asdict(config), "model": lm.model, "backend": lm.name, "runs": runs, "summary": summary}


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
