"""The continuous-batching engine on the real embedded model: concurrent requests against the
same requests one by one, the prefix cache, cancellation and a burst under a small KV cache."""

import asyncio
import time

import pytest

from apportion import LlamaEmbeddedBackend, Prompt, SamplingParams
from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT
from apportion.lm.llama_embedded import EmbeddedOptions, embedded_tokenizer

pytestmark = pytest.mark.embedded

QUESTIONS = [f"A farmer has {3 + i} sheep and buys {5 + 2 * i} more. How many sheep does he have?"
             for i in range(6)]
GREEDY = SamplingParams(max_tokens=16, temperature=0, logprobs=True)


@pytest.fixture()
async def lm():
    backend = LlamaEmbeddedBackend(EmbeddedOptions(seq_ctx=1024, kv_cells=8192))
    yield backend
    await backend.aclose()


def prompts() -> list[Prompt]:
    return [Prompt.chat(q, system=DEFAULT_SYSTEM_PROMPT) for q in QUESTIONS]


async def test_concurrent_requests_agree_with_sequential_ones_up_to_batched_arithmetic(lm):
    """Exact: every count (prompt tokens, output tokens, samples). Up to llama.cpp's arithmetic,
    which sums in another order when a token shares its batch with others: log-probabilities
    within 0.1 nats, and greedy texts equal until two tokens were nearly tied."""
    alone = [await lm.generate(p, GREEDY) for p in prompts()]
    together = await asyncio.gather(*(lm.generate(p, GREEDY) for p in prompts()))
    assert lm.stats.peak_active >= 2  # they really were decoded together
    same_text = 0
    for prompt, a, b in zip(prompts(), alone, together, strict=True):
        assert a.usage.input_tokens == b.usage.input_tokens == await lm.prompt_tokens(prompt)
        assert len(a.samples) == len(b.samples) == 1
        sa, sb = a.samples[0], b.samples[0]
        assert sa.output_tokens == sb.output_tokens == 16
        agree = 0
        tokens_a = embedded_tokenizer().tokenize(sa.text)
        tokens_b = embedded_tokenizer().tokenize(sb.text)
        while agree < min(len(tokens_a), len(tokens_b)) and tokens_a[agree] == tokens_b[agree]:
            agree += 1
        for lp_a, lp_b in list(zip(sa.logprobs, sb.logprobs, strict=True))[: max(agree - 1, 1)]:
            assert abs(lp_a - lp_b) < 0.1
        same_text += sa.text == sb.text
    assert same_text >= len(QUESTIONS) // 2


async def test_a_shared_system_prompt_is_served_from_the_prefix_cache(lm):
    first, second = prompts()[:2]
    a = await lm.generate(first, GREEDY)
    b = await lm.generate(second, GREEDY)
    tokenizer = embedded_tokenizer()
    engine = lm.load()
    t1, t2 = engine.prompt_tokens(first), engine.prompt_tokens(second)
    common = next(i for i, (x, y) in enumerate(zip(t1, t2)) if x != y)
    assert a.usage.cached_input_tokens == 0
    assert b.usage.cached_input_tokens == common > len(tokenizer.tokenize(DEFAULT_SYSTEM_PROMPT))
    assert lm.stats.prefix_hit_rate == pytest.approx(common / (len(t1) + len(t2)))


async def test_cancelling_a_request_frees_its_slots_at_once(lm):
    story = Prompt.chat("Write a very long story about a dragon and a knight.")
    task = asyncio.create_task(lm.generate(story, SamplingParams(n=8, max_tokens=1500, ignore_eos=True)))
    while lm.stats.peak_active < 8:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    quick = await lm.generate(prompts()[0], SamplingParams(max_tokens=8, temperature=0))
    assert quick.samples[0].output_tokens == 8
    assert time.monotonic() - started < 10  # not behind 8 x 1500 tokens
    assert lm.load().scheduler.active == 0
    assert lm.stats.cancelled == 1


async def test_a_burst_beyond_the_cache_queues_and_stays_under_its_bound():
    small = LlamaEmbeddedBackend(EmbeddedOptions(seq_ctx=256, kv_cells=1024, parallel=4, cache_cells=256))
    try:
        params = SamplingParams(n=2, max_tokens=24, temperature=0.8, seed=5)
        done = await asyncio.gather(*(small.generate(Prompt.chat(q), params) for q in QUESTIONS * 3))
        assert all(len(c.samples) == 2 for c in done)
        stats = small.stats
        assert stats.requests == 18 and stats.samples == 36
        assert stats.peak_cells <= 1024 and stats.peak_active <= 4
        assert stats.peak_queued > 4  # the burst waited in the queue, not in memory
    finally:
        await small.aclose()
