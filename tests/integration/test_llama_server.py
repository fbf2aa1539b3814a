"""The HTTP backend against a real OpenAI-compatible server: llama-cpp-python's, on 127.0.0.1, serving
the same GGUF as the embedded backend. It ignores ``n``, which the backend must notice."""

import asyncio

import pytest

from apportion import Budget, HTTPOptions, OpenAIHTTPBackend, Prompt, SamplingParams, SelfConsistency
from tests.conftest import cli_json, run_cli

pytestmark = pytest.mark.server

QUESTION = "Tom has 3 apples and gets 4 more. How many apples does he have?"


def http(url: str, **kw) -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(HTTPOptions(base_url=url, model="smollm2", **kw))


def test_self_consistency_over_http_makes_up_ignored_n(llama_server):
    async def main():
        lm = http(llama_server)
        assert await lm.check() == ["smollm2"]
        result = await SelfConsistency().run(lm, QUESTION, Budget(generations=4), seed=3)
        await lm.aclose()
        return lm, result

    lm, result = asyncio.run(main())
    assert len(result.candidates) == result.spent.generations == 4
    assert any("returned 1 of n=4" in note for note in result.trace[0].notes)
    # the other three asked for at once, one request each; one short reply is not yet taken as
    # evidence that the server ignores n
    assert len(result.trace) == 4
    assert lm.capabilities.native_n is True
    # four separate requests: the prompt is paid four times, as the server reported it
    assert result.spent.input_tokens % 4 == 0 and result.spent.input_tokens > 0
    assert result.spent.output_tokens == sum(c.output_tokens for c in result.candidates)
    assert not result.spent.estimated
    assert len({c.text for c in result.candidates}) > 1  # distinct seeds, distinct samples
    assert all(c.mean_logprob is not None for c in result.candidates)


def test_continuation_through_client_side_chatml(llama_server):
    async def main():
        lm = http(llama_server, continuation="chatml")
        # with a system message, so that the server's template and ChatML render the same turns
        question = Prompt.chat("What is 2 + 3?", system="Be brief.")
        base = await lm.generate(question, SamplingParams(max_tokens=4, temperature=0))
        cont = await lm.generate(question.continued("2 + 3 ="),
                                 SamplingParams(max_tokens=4, temperature=0, logprobs=True))
        await lm.aclose()
        return base, cont

    base, cont = asyncio.run(main())
    assert base.usage.input_tokens < cont.usage.input_tokens <= base.usage.input_tokens + 6
    assert cont.samples[0].text.strip()[:1].isdigit()
    assert cont.samples[0].logprobs is not None


def test_same_gguf_same_greedy_answer_embedded_and_server(llama_server):
    """The two backends run one model: a greedy answer through either must agree."""
    from apportion import LlamaEmbeddedBackend

    async def main():
        params = SamplingParams(max_tokens=12, temperature=0)
        prompt = Prompt.chat("Name the capital of France.")
        lm = http(llama_server)
        remote = await lm.generate(prompt, params)
        await lm.aclose()
        local = await LlamaEmbeddedBackend().generate(prompt, params)
        return remote, local

    remote, local = asyncio.run(main())
    assert remote.usage.input_tokens == local.usage.input_tokens
    assert remote.samples[0].text.split()[:3] == local.samples[0].text.split()[:3]


def test_cli_against_the_server(llama_server):
    out = cli_json("run", QUESTION, "--base-url", llama_server, "--model", "smollm2", "--budget", "3",
                   "--max-tokens", "64", "--seed", "1", "--price", "0.1,0.2")
    assert out["backend"].startswith("openai-http")
    assert out["spent"]["generations"] == 3
    expected = (out["spent"]["input_tokens"] * 0.1 + out["spent"]["output_tokens"] * 0.2) / 1e6
    assert out["spent"]["usd"] == pytest.approx(expected)


def test_cli_unknown_model_on_the_server(llama_server):
    proc = run_cli("run", QUESTION, "--base-url", llama_server, "--model", "gpt-9")
    assert proc.returncode == 2  # the command line names a model that is not there: a usage error
    assert "'gpt-9' is not served" in proc.stderr and "smollm2" in proc.stderr


def test_token_confidences_over_http_match_the_embedded_backends(llama_server):
    """DeepConf's token confidence from a real server's top_logprobs is the one the embedded
    backend computes from its own softmax: same model, same greedy tokens, the same numbers within
    the few percent that the two builds' kernels give the logits (the embedded backend turns
    weight repacking off; measured 3.4% apart at most)."""
    from apportion import LlamaEmbeddedBackend

    async def main():
        params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
        prompt = Prompt.chat("Name the capital of France.")
        lm = http(llama_server)
        remote = await lm.generate(prompt, params)
        await lm.aclose()
        local = await LlamaEmbeddedBackend().generate(prompt, params)
        return remote.samples[0], local.samples[0]

    remote, local = asyncio.run(main())
    assert remote.text == local.text and remote.confidences is not None and local.confidences is not None
    assert len(remote.confidences) == remote.output_tokens
    assert remote.confidences == pytest.approx(local.confidences, rel=0.06)
