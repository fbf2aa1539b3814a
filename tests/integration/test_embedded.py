"""The embedded SmolLM2-135M model, through the library and through the command line."""

import asyncio
import hashlib
import math

import pytest

from apportion import Budget, LlamaEmbeddedBackend, Prompt, SamplingParams, SelfConsistency
from tests.conftest import cli_json, run_cli

pytestmark = pytest.mark.embedded

QUESTION = "A farmer has 17 sheep and buys 25 more. How many sheep?"


SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_the_installed_weights_are_the_published_ones(gguf):
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == SMOLLM2_SHA256


@pytest.fixture(scope="module")
def lm():
    backend = LlamaEmbeddedBackend()
    yield backend
    asyncio.run(backend.aclose())


async def test_batched_samples_are_reproducible_and_accounted(lm):
    prompt = Prompt.chat(QUESTION)
    params = SamplingParams(n=4, max_tokens=24, seed=123, logprobs=True)
    first = await lm.generate(prompt, params)
    again = await lm.generate(prompt, params)
    assert [s.text for s in first.samples] == [s.text for s in again.samples]
    assert len({s.text for s in first.samples}) > 1  # distinct seeds per sequence
    assert first.usage.input_tokens == await lm.prompt_tokens(prompt)
    assert first.usage.output_tokens == sum(s.output_tokens for s in first.samples)
    for s in first.samples:
        assert 1 <= s.output_tokens <= 24
        assert len(s.logprobs) == s.output_tokens
        assert all(lp <= 0 and math.isfinite(lp) for lp in s.logprobs)
    # sample 0 of a batch equals a lone sample with the same seed: batching changes nothing
    lone = await lm.generate(prompt, SamplingParams(n=1, max_tokens=24, seed=123, logprobs=True))
    assert lone.samples[0].text == first.samples[0].text


async def test_waves_beyond_parallel_and_stop_strings(lm):
    small = LlamaEmbeddedBackend(lm.options.__class__(parallel=2, seq_ctx=512))
    completion = await small.generate(Prompt.chat(QUESTION),
                                      SamplingParams(n=5, max_tokens=40, seed=1, stop=(".",)))
    assert len(completion.samples) == 5
    for s in completion.samples:
        assert "." not in s.text
        assert s.finish_reason in ("stop", "length")
    await small.aclose()


async def test_continuation_resumes_the_assistant_turn(lm):
    prompt = Prompt.chat("What is 2 + 3?").continued("2 + 3 =")
    completion = await lm.generate(prompt, SamplingParams(max_tokens=4, temperature=0))
    assert completion.usage.input_tokens > await lm.prompt_tokens(Prompt.chat("What is 2 + 3?"))
    assert completion.samples[0].text.strip()[:1].isdigit()


async def test_deadline_returns_partial_samples(lm):
    import time

    started = time.monotonic()
    completion = await lm.generate(Prompt.chat("Write a long story about a dragon."),
                                   SamplingParams(n=2, max_tokens=2000, seed=3),
                                   deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 2.0
    assert {s.finish_reason for s in completion.samples} == {"deadline"}
    assert completion.usage.output_tokens == sum(s.output_tokens for s in completion.samples) > 0


async def test_self_consistency_on_the_embedded_model(lm):
    result = await SelfConsistency().run(lm, QUESTION, Budget(generations=4), seed=0)
    assert result.spent.generations == 4 and len(result.candidates) == 4
    assert result.spent.calls == 1  # the four samples came from one batched call
    assert result.spent.output_tokens == sum(c.output_tokens for c in result.candidates)
    assert sum(result.distribution.values()) == sum(1 for c in result.candidates if c.answer is not None)


def test_cli_answers_with_self_consistency_json():
    out = cli_json("run", QUESTION, "--algorithm", "self-consistency", "--budget", "4",
                   "--max-tokens", "96", "--seed", "0", "--trace")
    assert out["algorithm"] == "self-consistency"
    assert set(out["spent"]) >= {"generations", "input_tokens", "output_tokens", "usd", "seconds"}
    assert out["budget"]["generations"] == 4
    assert out["spent"]["generations"] == len(out["candidates"]) == 4
    assert out["spent"]["output_tokens"] == sum(c["output_tokens"] for c in out["candidates"])
    assert out["spent"]["output_tokens"] == sum(r["output_tokens"] for r in out["trace"])
    for c in out["candidates"]:
        assert {"text", "answer", "votes"} <= set(c)
    if out["answer"] is not None:
        assert out["distribution"][out["answer"]] == max(out["distribution"].values())
    assert out["model"] == "SmolLM2-135M-Instruct"


def test_cli_human_output_and_reproducible_seed():
    args = ("run", QUESTION, "--budget", "3", "--max-tokens", "48", "--seed", "7")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "Answer:" in first.stdout and "Spent:" in first.stdout and "3 generations" in first.stdout
    strip = [line for line in first.stdout.splitlines() if "Spent:" not in line]
    assert strip == [line for line in second.stdout.splitlines() if "Spent:" not in line]


def test_cli_best_of_n_with_token_budget():
    out = cli_json("run", QUESTION, "--algorithm", "best-of-n", "--budget", "tokens=400",
                   "--max-tokens", "64")
    assert out["spent"]["total_tokens"] <= 400
    assert out["exhausted"] and "tokens" in out["exhausted_reason"]
    assert all(c["score"] is not None for c in out["candidates"])
