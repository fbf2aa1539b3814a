"""Budget forcing and prompt modes on the embedded SmolLM2-135M model: forced answers really are
longer (a minimum of thinking tokens) or shorter (a maximum) in tokens, as asked."""

import asyncio
import re

import pytest

from apportion import (
    Budget,
    BudgetForcing,
    BudgetForcingOptions,
    EmbeddedOptions,
    LlamaEmbeddedBackend,
    SamplingOptions,
)

pytestmark = pytest.mark.embedded

# Greedy, SmolLM2 answers this in about 25 tokens of reasoning and then stops by itself.
QUESTION = "Tom has 3 apples and eats 1. How many apples are left?"
GREEDY = SamplingOptions(max_tokens=80, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def lm():
    # one thread: llama.cpp's spinning threads slow to a crawl on a machine busy with other work
    backend = LlamaEmbeddedBackend(EmbeddedOptions(n_threads=1))
    yield backend
    asyncio.run(backend.aclose())


def thinking_tokens(result) -> int:
    found = re.search(r"solution 1: (\d+) thinking tokens", " ".join(result.notes))
    assert found, result.notes
    return int(found.group(1))


async def run(lm, **kwargs):
    return await BudgetForcing(BudgetForcingOptions(sampling=GREEDY, answer_tokens=12, **kwargs)).run(
        lm, QUESTION, Budget(generations=1), seed=0)


async def test_a_minimum_makes_the_answer_longer_and_a_maximum_shorter(lm):
    natural = await run(lm)
    free = thinking_tokens(natural)
    assert 8 < free < 50  # the model reasons a little and ends thinking on its own

    longer = await run(lm, min_thinking_tokens=free + 25)
    assert thinking_tokens(longer) >= free + 25
    assert longer.candidates[0].output_tokens > natural.candidates[0].output_tokens
    assert "Wait," in longer.candidates[0].text
    assert (longer.spent.generations, longer.spent.continuations) == (1, longer.spent.calls - 1)
    assert longer.spent.continuations >= 2  # at least one "Wait" piece and the answer

    shorter = await run(lm, max_thinking_tokens=6)
    assert thinking_tokens(shorter) <= 6
    assert shorter.candidates[0].output_tokens <= 6 + 12 < natural.candidates[0].output_tokens
    assert "The answer is" in shorter.candidates[0].text and shorter.spent.generations == 1


async def test_a_token_budget_binds_forced_thinking(lm):
    budget = Budget(generations=1, output_tokens=60)
    result = await BudgetForcing(BudgetForcingOptions(sampling=GREEDY, min_thinking_tokens=70,
                                                      answer_tokens=12)).run(lm, QUESTION, budget, seed=0)
    assert result.spent.output_tokens <= 60 and result.spent.violations(budget) == []
    assert result.candidates and "The answer is" in result.candidates[0].text  # room was kept for the answer
