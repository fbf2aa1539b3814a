"""Backends served over the OpenAI protocol, on real sockets of 127.0.0.1: a sample bank through
`replay_app` (talked to by our own HTTP client and by raw httpx) and a scripted backend (to see
exactly what each request became)."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import httpx
import pytest

from apportion import Budget, HTTPOptions, OpenAIHTTPBackend, Prompt, SamplingParams, make_algorithm
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.errors import BackendError, BackendRequestError, BackendUnavailable, ModelNotFound
from apportion.lm.replay import ReplayBackend
from apportion.lm.scripted import Reply, ScriptedBackend
from apportion.serve import ServedApp, openai_app, replay_app

SYSTEM = "Solve the problem briefly. End with 'The answer is N'."
QUESTIONS = ("What is 3 + 4?", "What is 2 + 3?")
ANSWERS = (("7", "7", "8", "9"), ("5", "3", "5", "6"))


def _sample(q: int, i: int) -> BankSample:
    tokens = 3 + 2 * i + q  # distinct per sample, and what the logprobs' length says
    text = f"Working {q}.{i}: " + "step " * (tokens - 4) + f"The answer is {ANSWERS[q][i]}."
    logprobs = tuple(-0.01 * (q * 10 + i + 1) * (t + 1) for t in range(tokens))
    return BankSample(text, ANSWERS[q][i], tokens, logprobs, None, ANSWERS[q][i], "stop" if i else "length")


def make_bank() -> SampleBank:
    entries = [BankEntry(Problem(str(q), question, "7"), tuple(_sample(q, i) for i in range(4)), 20 + q,
                         Prompt.chat(question, system=SYSTEM).to_dict())
               for q, question in enumerate(QUESTIONS)]
    return SampleBank(entries, {"model": "banked-model"})


@pytest.fixture
def bank_path(tmp_path: Path) -> Path:
    path = tmp_path / "bank.jsonl"
    make_bank().save(path)
    return path


def client_backend(served: ServedApp, model: str = "banked-model") -> OpenAIHTTPBackend:
    return OpenAIHTTPBackend(HTTPOptions(base_url=served.base_url, model=model, backoff_s=0.01, timeout_s=5))


def chat_body(question: str, **kw: object) -> dict[str, object]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"model": "banked-model", "messages": messages, **kw}


# -- replay-serve --------------------------------------------------------------------------------


async def test_our_client_gets_every_recorded_sample_once_then_a_clear_refusal(bank_path):
    entry = make_bank().entries[0]
    recorded = {s.text: s for s in entry.samples}
    with ServedApp(replay_app(bank_path, seed=3)) as served:
        lm = client_backend(served)
        assert await lm.check() == ["banked-model"]
        prompt = Prompt.chat(QUESTIONS[0], system=SYSTEM)
        served_samples = []
        for _ in range(2):
            completion = await lm.generate(prompt, SamplingParams(n=2, logprobs=True))
            assert len(completion.samples) == 2 and not completion.notes
            assert completion.usage.input_tokens == entry.prompt_tokens and not completion.usage.estimated
            assert completion.usage.output_tokens == sum(s.output_tokens for s in completion.samples)
            served_samples.extend(completion.samples)
        assert lm.capabilities.native_n is True
        assert sorted(s.text for s in served_samples) == sorted(recorded)
        for s in served_samples:
            assert s.output_tokens == recorded[s.text].output_tokens
            assert s.logprobs == recorded[s.text].logprobs
            assert s.finish_reason == recorded[s.text].finish_reason
        started = time.monotonic()
        with pytest.raises(BackendRequestError, match="exhausted: all 4 recorded samples") as info:
            await lm.generate(prompt, SamplingParams(n=2))
        assert info.value.status == 410
        assert time.monotonic() - started < 1  # refused once, not retried with backoff
        with pytest.raises(ModelNotFound, match="prompt not in the bank: 'What is 1 \\+ 1\\?'"):
            await lm.generate(Prompt.chat("What is 1 + 1?"), SamplingParams())
        await lm.aclose()


async def test_raw_http_sees_openai_shaped_replies_and_errors(bank_path):
    entry = make_bank().entries[1]
    recorded = {s.text: s for s in entry.samples}
    with ServedApp(replay_app(bank_path, seed=0)) as served:
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            seen = []
            for _ in range(2):
                r = await http.post("/chat/completions", json=chat_body(QUESTIONS[1], n=2, logprobs=True))
                assert r.status_code == 200
                data = r.json()
                assert data["object"] == "chat.completion" and data["model"] == "banked-model"
                assert data["id"].startswith("chatcmpl-") and isinstance(data["created"], int)
                assert [c["index"] for c in data["choices"]] == [0, 1]
                for choice in data["choices"]:
                    text = choice["message"]["content"]
                    assert choice["message"]["role"] == "assistant"
                    assert choice["finish_reason"] == recorded[text].finish_reason
                    tokens = choice["logprobs"]["content"]
                    assert [t["logprob"] for t in tokens] == list(recorded[text].logprobs)
                    assert all(t["token"] == "" and t["top_logprobs"] == [] for t in tokens)
                    seen.append(text)
                completion_tokens = sum(recorded[c["message"]["content"]].output_tokens for c in data["choices"])
                assert data["usage"] == {"prompt_tokens": entry.prompt_tokens, "completion_tokens": completion_tokens,
                                         "total_tokens": entry.prompt_tokens + completion_tokens}
            assert sorted(seen) == sorted(recorded)
            r = await http.post("/chat/completions", json=chat_body(QUESTIONS[1], n=2))
            assert r.status_code == 410
            assert r.json()["error"]["code"] == "bank_exhausted"
            assert "all 4 recorded samples" in r.json()["error"]["message"]
            # the other question is untouched; no logprobs unless asked
            r = await http.post("/chat/completions", json=chat_body(QUESTIONS[0]))
            assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
            r = await http.post("/chat/completions", json=chat_body("What is the capital of France?"))
            assert r.status_code == 404
            assert r.json()["error"]["message"] == "prompt not in the bank: 'What is the capital of France?'"
            r = await http.post("/chat/completions", json={**chat_body(QUESTIONS[0]), "model": "gpt-4"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            # raw prompt text matches the question too, in the legacy completions format
            r = await http.post("/completions", json={"model": "banked-model", "prompt": QUESTIONS[0], "logprobs": 1})
            assert r.status_code == 200
            choice = r.json()["choices"][0]
            assert r.json()["object"] == "text_completion"
            assert len(choice["logprobs"]["token_logprobs"]) == len(choice["logprobs"]["tokens"])


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
async def test_self_consistency_over_http_matches_it_run_on_the_bank_directly(bank_path, seed):
    bank = make_bank()
    budget = Budget(generations=3)
    direct_lm = ReplayBackend(bank, seed=seed)
    direct = [await make_algorithm("self-consistency").run(direct_lm, q, budget, seed=seed) for q in QUESTIONS]
    with ServedApp(replay_app(bank_path, seed=seed)) as served:
        lm = client_backend(served)
        remote = [await make_algorithm("self-consistency").run(lm, q, budget, seed=seed) for q in QUESTIONS]
        await lm.aclose()
    for d, r in zip(direct, remote):
        assert r.answer == d.answer and r.distribution == d.distribution
        assert [c.text for c in r.candidates] == [c.text for c in d.candidates]
        assert (r.spent.generations, r.spent.output_tokens, r.spent.input_tokens, r.spent.calls) == (
            d.spent.generations, d.spent.output_tokens, d.spent.input_tokens, d.spent.calls)
        assert not r.spent.estimated
    assert any(len(d.distribution) > 1 for d in direct)  # a real vote, where order decides ties


# -- the translation, seen from the backend -------------------------------------------------------


FAILURES = {"fail": BackendError("the model crashed"), "down": BackendUnavailable("upstream is down")}


def _scripted_reply(prompt: Prompt, params: SamplingParams, call: int, i: int) -> str | Reply:
    question = prompt.messages[-1].content if prompt.is_chat else prompt.text
    if question in FAILURES:
        return Reply("", error=FAILURES[question])
    return ("one two three", "four five")[i % 2]


@pytest.fixture(scope="module")
def scripted():
    lm = ScriptedBackend(_scripted_reply, model="scripted-model")
    with ServedApp(openai_app(lm)) as served:
        yield lm, served


def post(served: ServedApp, path: str, body: object) -> httpx.Response:
    return httpx.post(served.base_url + path, json=body, timeout=5)


def test_every_sampling_field_reaches_the_backend(scripted):
    lm, served = scripted
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    body = {"model": "scripted-model", "n": 2, "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
            "seed": 3, "stop": "x", "logprobs": True, "top_logprobs": 1, "ignore_eos": True,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": parts}],
            "user": "someone", "presence_penalty": 0, "tools": None, "stream": False}
    r = post(served, "/chat/completions", body)
    assert r.status_code == 200, r.text
    call = lm.calls[-1]
    assert call.params == SamplingParams(n=2, max_tokens=7, temperature=0.5, top_p=0.9, stop=("x",), seed=3,
                                         logprobs=True, ignore_eos=True)
    assert call.prompt == Prompt.chat("Hi\nthere", system="Be brief.")
    data = r.json()
    assert [c["message"]["content"] for c in data["choices"]] == ["one two three", "four five"]
    assert data["usage"]["completion_tokens"] == 5
    assert [len(c["logprobs"]["content"]) for c in data["choices"]] == [3, 2]


def test_continuation_and_raw_prompts(scripted):
    lm, served = scripted
    body = {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "zero"}],
            "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 4}
    assert post(served, "/chat/completions", body).status_code == 200
    assert lm.calls[-1].prompt == Prompt.chat("Count.").continued("zero")
    assert lm.calls[-1].params.temperature == 1.0  # OpenAI's default, not ours
    r = post(served, "/completions", {"model": "scripted-model", "prompt": ["Once upon"], "max_tokens": 2})
    assert r.status_code == 200
    assert lm.calls[-1].prompt == Prompt.raw("Once upon")
    assert r.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("body, status, param, message", [
    ({"n": 0}, 400, "n", "n must be an integer >= 1, got 0"),
    ({"n": "2"}, 400, "n", "n must be an integer"),
    ({"max_tokens": 0}, 400, "max_tokens", "max_tokens must be an integer >= 1"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens", "disagree"),
    ({"temperature": -0.5}, 400, "temperature", "temperature must be >= 0"),
    ({"temperature": 9}, 400, "temperature", r"temperature must be in \[0, 5\]"),
    ({"top_p": 0}, 400, "top_p", "top_p"),
    ({"stop": ["", "x"]}, 400, "stop", "stop"),
    ({"seed": 1.5}, 400, "seed", "seed"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ({"stream": True}, 400, "stream", "stream"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported parameter"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "response_format"),
    ({"presence_penalty": 0.5, "top_k": 5}, 400, "presence_penalty", "presence_penalty, top_k"),
    ({"messages": None}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content", "text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "messages",
     "continue_final_message"),
    ({"continue_final_message": True}, 400, "continue_final_message", "final assistant message"),
    ({"model": "other"}, 404, "model", "'other' does not exist"),
])
def test_invalid_requests_are_refused_naming_the_field(scripted, body, status, param, message):
    lm, served = scripted
    calls = len(lm.calls)
    r = post(served, "/chat/completions", {"model": "scripted-model", "messages": [{"role": "user", "content": "Hi"}],
                                           **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert re.search(message, error["message"]), error["message"]
    assert len(lm.calls) == calls  # refused before the backend was asked


def test_malformed_bodies_routes_and_models(scripted):
    _, served = scripted
    r = httpx.post(served.base_url + "/chat/completions", content=b"{not json", timeout=5)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert post(served, "/chat/completions", [1, 2]).status_code == 400
    r = post(served, "/completions", {"prompt": [1, 2, 3]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert post(served, "/completions", {"prompt": "x", "echo": True}).json()["error"]["param"] == "echo"
    r = httpx.get(served.base_url + "/nowhere", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.get(served.base_url + "/chat/completions", timeout=5).status_code == 405
    models = httpx.get(served.base_url + "/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["scripted-model"]
    assert httpx.get(served.base_url + "/models/scripted-model", timeout=5).status_code == 200
    assert httpx.get(served.base_url + "/models/else", timeout=5).status_code == 404


@pytest.mark.parametrize("question, status, code", [("fail", 502, "backend_error"),
                                                    ("down", 503, "backend_unavailable")])
def test_backend_failures_become_openai_errors(scripted, question, status, code):
    _, served = scripted
    r = post(served, "/chat/completions", {"messages": [{"role": "user", "content": question}]})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "server_error"
    assert str(FAILURES[question]) in error["message"]


def test_continuation_is_refused_where_the_backend_cannot_continue(bank_path):
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "So"}],
            "continue_final_message": True}
    with ServedApp(replay_app(bank_path)) as served:
        r = post(served, "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_served_app_stops_cleanly(bank_path):
    with ServedApp(replay_app(bank_path)) as served:
        url = served.base_url
        assert httpx.get(url + "/models", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models", timeout=2)


def test_no_nagle_stall_between_requests(bank_path):
    # without TCP_NODELAY on the served socket each keep-alive request waits ~40 ms for a delayed ACK
    with ServedApp(replay_app(bank_path)) as served, httpx.Client(base_url=served.base_url) as http:
        times = []
        for _ in range(15):
            started = time.perf_counter()
            assert http.get("/models").status_code == 200
            times.append(time.perf_counter() - started)
    assert statistics.median(times) < 0.025, times
