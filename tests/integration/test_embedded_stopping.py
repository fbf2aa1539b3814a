"""Stopping rules and deadlines on the embedded model: a live run and the replay of its own
samples stop at the same sample, and a deadline run ends on time with a flagged answer."""

import asyncio
import time
from dataclasses import replace

import pytest

from apportion import Budget, LlamaEmbeddedBackend, Prompt, SamplingOptions, SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.stopping import DeepConf
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.lm.replay import ReplayBackend

pytestmark = pytest.mark.embedded

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"


@pytest.fixture(scope="module")
def lm():
    backend = LlamaEmbeddedBackend()
    yield backend
    asyncio.run(backend.aclose())


async def test_deepconf_live_and_its_replay_stop_and_cut_at_the_same_tokens(lm):
    sampling = SamplingOptions(max_tokens=48, batch_size=4)
    rule = DeepConf(warmup=4, round=4, window=6, keep=0.5)
    live = await SelfConsistency(SelfConsistencyOptions(sampling, rule)).run(lm, QUESTION, Budget(generations=12),
                                                                            seed=11)
    cut = [c for c in live.candidates if c.finish_reason == "cut"]
    assert cut and all(c.answer is None for c in cut)  # traces under the warmup floor were ended early
    assert live.spent.output_tokens == sum(c.output_tokens for c in live.candidates)
    # the same samples drawn whole (same seeds: the same tokens up to any cut), as a bank in draw order
    whole = await SelfConsistency(SelfConsistencyOptions(replace(sampling, top_logprobs=rule.top_k))).run(
        lm, QUESTION, Budget(generations=12), seed=11)
    calls = -(-len(live.candidates) // 4)
    bank = SampleBank([BankEntry(Problem("0", QUESTION, "42"),
                                 tuple(BankSample(c.text, c.answer, c.output_tokens, c.logprobs, None, c.raw_answer,
                                                  c.finish_reason, c.extraction, c.confidences)
                                       for c in whole.candidates[: 4 * calls]),
                                 live.spent.input_tokens)])
    replayed = await SelfConsistency(SelfConsistencyOptions(sampling, rule)).run(
        ReplayBackend(bank, seed=None), QUESTION, Budget(generations=12), seed=11)
    assert [c.output_tokens for c in replayed.candidates] == [c.output_tokens for c in live.candidates]
    assert [c.finish_reason for c in replayed.candidates] == [c.finish_reason for c in live.candidates]
    assert (replayed.answer, replayed.stop_reason, replayed.spent.output_tokens) == \
        (live.answer, live.stop_reason, live.spent.output_tokens)


async def test_a_deadline_run_ends_on_time_with_a_flagged_answer(lm):
    # 64 samples of up to 256 tokens take a minute here: the deadline, not the budget, ends the run
    await lm.prompt_tokens(Prompt.chat(QUESTION))  # the model loaded before the clock starts
    started = time.monotonic()
    result = await SelfConsistency(SelfConsistencyOptions(SamplingOptions(max_tokens=256))).run(
        lm, QUESTION, Budget(generations=64, seconds=5), seed=1)
    elapsed = time.monotonic() - started
    assert elapsed < 5 + 1.0  # a decode step in flight at the deadline finishes; steps are ~0.1 s here
    assert result.stop_reason == "deadline" and result.stopped_early
    assert result.candidates and result.spent.seconds <= 5 + 1.0
