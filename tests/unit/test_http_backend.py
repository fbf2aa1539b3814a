"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1 that misbehaves on cue."""

import pytest

from apportion import Budget, HTTPOptions, OpenAIHTTPBackend, Prompt, SamplingParams, SelfConsistency
from apportion.budget.ledger import Ledger
from apportion.errors import BackendRequestError, BackendUnavailable, ModelNotFound, RunFailed
from apportion.lm.metered import MAX_FRUITLESS_ROUNDS, MeteredLM
from tests.support.fake_openai import FakeOpenAI

QUESTION = "What is 40 plus 2?"


def backend(server: FakeOpenAI, **kw) -> OpenAIHTTPBackend:
    options = {"base_url": server.base_url, "model": server.model, "backoff_s": 0.01, "timeout_s": 0.5, **kw}
    return OpenAIHTTPBackend(HTTPOptions(**options))


async def test_n_is_one_request_from_the_start():
    with FakeOpenAI() as server:
        lm = backend(server)
        assert lm.capabilities.native_n is True  # asking for n costs no more than one sample would
        completion = await lm.generate(Prompt.chat(QUESTION), SamplingParams(n=4, max_tokens=32, logprobs=True))
        assert len(completion.samples) == 4
        assert server.billing.requests == 1
        assert completion.usage.input_tokens == server.billing.prompt_tokens
        assert completion.usage.output_tokens == server.billing.completion_tokens
        assert completion.samples[0].logprobs == (-0.25,) * completion.samples[0].output_tokens
        await lm.aclose()


async def test_a_short_reply_is_returned_as_it_came():
    """The backend makes one request and returns what it got; making up the rest is the metered
    layer's job, through the ledger."""
    with FakeOpenAI(honor_n=False) as server:
        lm = backend(server)
        completion = await lm.generate(Prompt.chat(QUESTION), SamplingParams(n=4, max_tokens=32, seed=5))
        assert len(completion.samples) == 1 and server.billing.requests == 1
        assert any("returned 1 of n=4" in note for note in completion.notes)
        assert completion.usage.input_tokens == server.billing.prompt_tokens
        await lm.aclose()


async def test_server_ignoring_n_is_made_up_through_the_ledger_with_distinct_seeds():
    with FakeOpenAI(honor_n=False) as server:
        lm = backend(server)
        metered = MeteredLM(lm, Ledger(Budget(generations=100)))
        completion = await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=4, max_tokens=32, seed=5))
        assert len(completion.samples) == 4
        assert sorted(b.get("seed") for b in server.billing.bodies) == [5, 6, 7, 8]
        # one choice for n=4: the other three go out at once, one sample each, in one more round
        assert [b["n"] for b in server.billing.bodies] == [4, 1, 1, 1]
        assert "4 of n=4 samples in 4 requests" in completion.notes
        assert lm.capabilities.native_n is True  # one short reply is not yet evidence
        for _ in range(2):
            await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=3, max_tokens=32))
        # three one-choice replies to n > 1 in a row are: from now on one request per sample
        assert [b["n"] for b in server.billing.bodies[4:]] == [3, 1, 1] * 2
        assert lm.capabilities.native_n is False
        await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=3, max_tokens=32))
        assert [b["n"] for b in server.billing.bodies[10:]] == [1, 1, 1]
        spent = metered.ledger.spend()
        assert spent.input_tokens == server.billing.prompt_tokens == 13 * (server.billing.prompt_tokens // 13)
        assert len(metered.ledger.trace) == 13  # every request reserved and settled on its own
        await lm.aclose()


async def test_the_samples_an_ignored_n_left_out_are_asked_for_concurrently():
    """Two round trips for n=8 on a server that ignores n, whatever it has been seen to do."""
    with FakeOpenAI(honor_n=False, delay_s=0.2) as server:
        lm = backend(server, timeout_s=5.0)
        metered = MeteredLM(lm, Ledger(Budget(generations=100)))
        completion = await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=8, max_tokens=32))
        assert len(completion.samples) == 8 and [b["n"] for b in server.billing.bodies] == [8] + [1] * 7
        assert server.peak_in_flight == 7  # the seven singles were in flight together
        await lm.aclose()


async def test_retries_what_cost_nothing_and_charges_what_may_have_cost():
    faults = ["500", "429", "timeout", "malformed", "disconnect"]
    with FakeOpenAI(faults=faults, timeout_sleep_s=1.0) as server:
        lm = backend(server, max_retries=8, timeout_s=0.4)
        result = await SelfConsistency().run(lm, QUESTION, Budget(generations=3))
        assert result.answer == "42" and result.error is None
        assert result.spent.generations == 3
        assert server.billing.requests == 6  # 500 and 429 retried by the backend, the rest by the metered layer
        # the timed-out, malformed and disconnected replies were charged: never less than billed
        assert result.spent.input_tokens >= server.billing.prompt_tokens
        assert result.spent.output_tokens >= server.billing.completion_tokens
        assert result.spent.estimated
        failed = [r for r in result.trace if r.error]
        assert len(failed) == 3 and all(r.usage.output_tokens > 0 for r in failed)
        assert "after 2 retried: HTTP 500; HTTP 429" in (failed[0].error or "")
        await lm.aclose()


async def test_a_server_that_keeps_failing_after_generating_is_given_up_with_the_spend():
    with FakeOpenAI(faults=["malformed"] * 10) as server:
        lm = backend(server)
        with pytest.raises(RunFailed, match="malformed") as failure:
            await SelfConsistency().run(lm, QUESTION, Budget(generations=3))
        assert server.billing.requests == MAX_FRUITLESS_ROUNDS
        result = failure.value.result
        assert result.answer is None and result.error and not result.partial
        assert result.spent.calls == MAX_FRUITLESS_ROUNDS and result.spent.output_tokens > 0
        await lm.aclose()


async def test_gives_up_after_max_retries_and_charges_nothing_unbilled():
    with FakeOpenAI(faults=["500"] * 10) as server:
        lm = backend(server, max_retries=2)
        with pytest.raises(BackendUnavailable, match="after 3 attempt"):
            await lm.generate(Prompt.chat(QUESTION), SamplingParams())
        assert server.billing.requests == 3
        metered = MeteredLM(lm, Ledger(Budget(generations=2)))
        with pytest.raises(BackendUnavailable):
            await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=2))
        assert metered.ledger.spend().total_tokens == 0 and metered.ledger.remaining().generations == 2
        await lm.aclose()


async def test_a_failure_after_some_samples_keeps_them():
    with FakeOpenAI(honor_n=False, faults=["ok", "500", "500", "500"]) as server:
        lm = backend(server, max_retries=0)
        metered = MeteredLM(lm, Ledger(Budget(generations=4)))
        completion = await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=4, max_tokens=32))
        assert len(completion.samples) == 1
        assert isinstance(completion.error, BackendUnavailable)
        assert metered.ledger.spend().output_tokens == server.billing.completion_tokens
        assert any("keeping the 1 samples drawn" in n for n in completion.notes)
        await lm.aclose()


async def test_missing_usage_is_estimated_and_flagged():
    with FakeOpenAI(usage=False) as server:
        lm = backend(server)
        result = await SelfConsistency().run(lm, QUESTION, Budget(generations=2))
        assert result.spent.estimated
        assert result.spent.output_tokens > 0 and result.spent.input_tokens > 0
        assert any("estimated" in n for n in result.trace[0].notes)
        await lm.aclose()


async def test_client_errors_are_not_retried_and_named():
    with FakeOpenAI() as server:
        lm = OpenAIHTTPBackend(HTTPOptions(base_url=server.base_url, model="wrong-model"))
        with pytest.raises(ModelNotFound, match="not served"):
            await lm.check()
        with pytest.raises(ModelNotFound, match="404"):
            await lm.generate(Prompt.chat(QUESTION), SamplingParams())
        assert server.billing.requests == 1
        await lm.aclose()


async def test_unreachable_server_fails_fast():
    with FakeOpenAI() as server:
        url = server.base_url
    lm = OpenAIHTTPBackend(HTTPOptions(base_url=url, model="m"))
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await lm.check()
    with pytest.raises(BackendUnavailable, match="cannot reach"):
        await lm.generate(Prompt.chat(QUESTION), SamplingParams())


async def test_continuation_and_raw_prompts_use_the_right_endpoint():
    with FakeOpenAI() as server:
        lm = backend(server)
        await lm.generate(Prompt.chat(QUESTION).continued("Let me think."), SamplingParams())
        body = server.billing.bodies[-1]
        assert body["messages"][-1] == {"role": "assistant", "content": "Let me think."}
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        completion = await lm.generate(Prompt.raw("2 + 2 ="), SamplingParams(n=2, logprobs=True))
        assert server.billing.bodies[-1]["prompt"] == "2 + 2 =" and len(completion.samples) == 2
        assert completion.samples[0].logprobs is not None
        await lm.aclose()


def test_bad_options_are_named():
    with pytest.raises(Exception, match="http"):
        HTTPOptions(base_url="localhost:8000", model="m")
    with pytest.raises(Exception, match="model"):
        HTTPOptions(base_url="http://x", model="")


async def test_prompt_tokens_learned_exactly_after_first_call():
    with FakeOpenAI() as server:
        lm = backend(server)
        prompt = Prompt.chat(QUESTION)
        bound = await lm.prompt_tokens(prompt)
        completion = await lm.generate(prompt, SamplingParams())
        assert bound >= completion.usage.input_tokens
        assert await lm.prompt_tokens(prompt) == completion.usage.input_tokens
        await lm.aclose()


async def test_bad_request_is_not_retried_and_surfaces_the_server_message():
    with FakeOpenAI(faults=["400"]) as server:
        lm = backend(server)
        with pytest.raises(BackendRequestError, match=r"HTTP 400.*max_tokens is too large"):
            await lm.generate(Prompt.chat(QUESTION), SamplingParams())
        assert server.billing.requests == 1
        await lm.aclose()


async def test_top_logprobs_become_token_confidences_in_both_formats():
    with FakeOpenAI() as server:
        lm = backend(server)
        expected = -(-0.25 - 1.0 - 1.5) / 3
        for prompt in (Prompt.chat(QUESTION), Prompt.raw(QUESTION)):
            completion = await lm.generate(prompt, SamplingParams(n=2, max_tokens=8, logprobs=True, top_logprobs=3))
            sample = completion.samples[0]
            assert sample.confidences == pytest.approx((expected,) * sample.output_tokens)
        assert server.billing.bodies[0]["top_logprobs"] == 3 and server.billing.bodies[1]["logprobs"] == 3
        await lm.aclose()
    # a server that sends fewer alternatives than asked is not measuring the same thing: none
    from apportion.lm.http_reply import _choice_confidences
    choice = {"logprobs": {"content": [{"logprob": -0.1, "top_logprobs": [{"logprob": -0.1}]}]}}
    assert _choice_confidences(choice, 1) == (0.1,)
    assert _choice_confidences(choice, 3) is None


async def test_a_cut_over_http_is_applied_afterwards_and_every_token_charged():
    with FakeOpenAI() as server:
        lm = backend(server)
        assert lm.capabilities.cut is False
        metered = MeteredLM(lm, Ledger(Budget(generations=10)))
        cut = lambda part: len(part.logprobs) >= 2  # noqa: E731
        completion = await metered.generate(Prompt.chat(QUESTION), SamplingParams(n=3, max_tokens=32, logprobs=True,
                                                                                  cut=cut))
        assert [s.finish_reason for s in completion.samples] == ["cut"] * 3
        assert all(s.text == "" for s in completion.samples)
        assert metered.ledger.spend().output_tokens == server.billing.completion_tokens
        assert sum(s.output_tokens for s in completion.samples) == server.billing.completion_tokens
        assert any("cannot stop a sample mid-decode" in n for n in completion.notes)
        await lm.aclose()
