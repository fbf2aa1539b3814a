"""``algorithm_app``: every algorithm behind the OpenAI protocol, over a scripted backend, through
httpx's ASGI transport (the logic) and on real sockets of 127.0.0.1 under uvicorn (the OpenAI
client, streams, disconnects)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import ALGORITHMS, NEEDS_PROCESS_SCORER
from apportion.budget.units import Budget, Price
from apportion.errors import BackendError, ConfigError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.scripted import Reply, ScriptedBackend
from apportion.serve import ServedApp
from apportion.serve.algorithm_app import ServeOptions, algorithm_app
from apportion.serve.hooks import RequestFinished, RequestStarted
from apportion.serve.quota_contract import Charge, InvalidKey, KeyInfo, QuotaExceeded

MODEL = "m"
QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]


def replies(*answers: str) -> list[str]:
    return [f"Adding them. The answer is {a}." for a in answers]


def backend(*answers: str, **kw: Any) -> ScriptedBackend:
    return ScriptedBackend(replies(*(answers or ("7", "7", "8"))), model=MODEL, **kw)


@asynccontextmanager
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": QUESTION, **kw}


def events(text: str) -> list[Any]:
    """The data of each server-sent event, JSON-decoded ("[DONE]" kept as text)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    return dict(body["error"])


class Recorder:
    """An observer keeping what it hears (called on the server's thread under uvicorn)."""

    def __init__(self) -> None:
        self.started: list[RequestStarted] = []
        self.finished: list[RequestFinished] = []
        self.done = threading.Event()

    def request_started(self, event: RequestStarted) -> None:
        self.started.append(event)

    def request_finished(self, event: RequestFinished) -> None:
        self.finished.append(event)
        self.done.set()


class FakeQuota:
    """An in-memory QuotaStore: grants up to what is left, keeps every want, grant and settlement."""

    def __init__(self, keys: dict[str, KeyInfo], *, tokens_left: int | None = None, usd_left: Fraction | None = None,
                 exceeded: QuotaExceeded | None = None) -> None:
        self.keys = keys
        self.tokens_left = tokens_left
        self.usd_left = usd_left
        self.exceeded = exceeded
        self.wants: dict[str, Charge] = {}
        self.grants: dict[str, Charge] = {}
        self.settled: dict[str, Charge] = {}
        self.settled_event = threading.Event()

    async def authenticate(self, secret: str) -> KeyInfo:
        if secret not in self.keys:
            raise InvalidKey("no such key (or revoked)")
        return self.keys[secret]

    async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
        if self.exceeded is not None:
            raise self.exceeded
        tokens = want.tokens if self.tokens_left is None else min(want.tokens, self.tokens_left)
        usd = want.usd if self.usd_left is None else min(want.usd, self.usd_left)
        self.wants[request_id] = want
        self.grants[request_id] = Charge(tokens, usd, want.requests)
        return self.grants[request_id]

    async def settle(self, request_id: str, spent: Charge) -> None:
        assert request_id in self.grants and request_id not in self.settled
        self.settled[request_id] = spent
        self.settled_event.set()

    async def recover(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None


class ConstantScorer:
    """A process scorer rating every step 0.5, for free."""

    name = "constant"

    async def score(self, lm: Any, question: str, paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        return [[0.5] * len(p) for p in paths]


# -- algorithms, budgets, responses ----------------------------------------------------------------


async def test_self_consistency_answers_the_majority_with_the_whole_spend_as_usage():
    lm = backend("7", "7", "8")
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(
            apportion={"algorithm": "sc", "budget": {"gen": 6, "tokens": 4000}, "candidates": True}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert r.headers["x-request-id"] == body["id"]
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Adding them. The answer is 7."}
    assert choice["finish_reason"] == "stop"
    extra = body["apportion"]
    assert extra["algorithm"] == "self-consistency" and extra["answer"] == "7"
    assert extra["distribution"] == {"7": 4.0, "8": 2.0}
    assert extra["budget"] == {"generations": 6, "total_tokens": 4000}  # the aliases echoed by their names
    spent = extra["spent"]
    assert spent["generations"] == 6 and len(extra["candidates"]) == 6 and "trace" not in extra
    assert body["usage"] == {"prompt_tokens": spent["input_tokens"], "completion_tokens": spent["output_tokens"],
                             "total_tokens": spent["total_tokens"]}
    # what the backend saw: one call of six samples, whose prompt and output are exactly the usage
    [call] = lm.calls
    assert call.params.n == 6
    assert spent["input_tokens"] == await lm.prompt_tokens(call.prompt)
    assert spent["output_tokens"] == 6 * 6  # six samples of six words (the scripted backend's tokens)


async def test_candidates_and_trace_only_when_asked():
    async with client(algorithm_app(backend())) as c:
        plain = (await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 3}))).json()
        full = (await c.post("/v1/chat/completions", json=chat(
            apportion={"algorithm": "sc", "budget": 3, "candidates": True, "trace": True}))).json()
    assert "candidates" not in plain["apportion"] and "trace" not in plain["apportion"]
    assert len(full["apportion"]["candidates"]) == 3 and len(full["apportion"]["trace"]) == 1


@pytest.mark.parametrize(("model", "algorithm", "generations"), [
    ("sc-3/m", "self-consistency", 3),
    ("best-of-n-2/m", "best-of-n", 2),
    ("weighted-bon-4/m", "weighted-best-of-n", 4),
    ("majority/m", "self-consistency", 8),  # no N: the server's default budget
])
async def test_a_model_name_prefix_chooses_algorithm_and_generations(model, algorithm, generations):
    lm = backend()
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json={"model": model, "messages": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model
    assert body["apportion"]["algorithm"] == algorithm
    assert body["apportion"]["budget"]["generations"] == generations
    assert body["apportion"]["spent"]["generations"] == generations


async def test_prefix_and_object_together_must_agree():
    async with client(algorithm_app(backend())) as c:
        agree = await c.post("/v1/chat/completions", json={
            "model": "sc-3/m", "messages": QUESTION, "apportion": {"algorithm": "sc", "budget": {"tokens": 5000}}})
        algorithm = await c.post("/v1/chat/completions", json={
            "model": "sc-3/m", "messages": QUESTION, "apportion": {"algorithm": "bon"}})
        budget = await c.post("/v1/chat/completions", json={
            "model": "sc-3/m", "messages": QUESTION, "apportion": {"algorithm": "sc", "budget": 4}})
    assert agree.status_code == 200
    assert agree.json()["apportion"]["budget"] == {"generations": 3, "total_tokens": 5000}
    assert "self-consistency" in assert_openai_error(algorithm, 400)["message"]
    assert "3 generations" in assert_openai_error(budget, 400)["message"]


async def test_unknown_models_and_prefixes():
    async with client(algorithm_app(backend())) as c:
        other = await c.post("/v1/chat/completions", json={"model": "sc-3/other", "messages": QUESTION})
        bare = await c.post("/v1/chat/completions", json={"model": "other", "messages": QUESTION})
        prefix = await c.post("/v1/chat/completions", json={"model": "nope-3/m", "messages": QUESTION})
        models = (await c.get("/v1/models")).json()
        health = await c.get("/health")
    assert assert_openai_error(other, 404)["code"] == "model_not_found"
    assert assert_openai_error(bare, 404)["param"] == "model"
    error = assert_openai_error(prefix, 400)
    assert error["code"] == "unknown_algorithm" and "'nope'" in error["message"]
    assert [m["id"] for m in models["data"]] == [MODEL]  # the backend's model, nothing invented
    assert health.json() == {"status": "ok", "model": MODEL}


@pytest.mark.parametrize("name", [*ALGORITHMS, "planning/beam-search"])
async def test_every_algorithm_answers_within_its_budget(name):
    lm = ScriptedBackend(["First, 3 + 4 = 7.\n\nThe answer is 7."], model=MODEL)
    spec: dict[str, Any] = {"algorithm": name, "budget": {"gen": 4, "tokens": 3000}}
    if name.split("/")[-1] in NEEDS_PROCESS_SCORER:
        spec["process_scorer"] = "constant"
    async with client(algorithm_app(lm, process_scorers={"constant": ConstantScorer})) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion=spec, max_tokens=40))
    assert r.status_code == 200, r.text
    body = r.json()
    spent = body["apportion"]["spent"]
    assert spent["generations"] <= 4 and spent["total_tokens"] <= 3000
    assert body["usage"]["total_tokens"] == spent["total_tokens"] > 0
    assert len(body["choices"]) == 1 and isinstance(body["choices"][0]["message"]["content"], str)


async def test_a_search_without_a_process_scorer_is_refused_naming_what_is_offered():
    async with client(algorithm_app(backend(), process_scorers={"constant": ConstantScorer})) as c:
        missing = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "dvts"}))
        unknown = await c.post("/v1/chat/completions", json=chat(
            apportion={"algorithm": "dvts", "process_scorer": "prm:base_url=http://evil"}))
    assert "constant" in assert_openai_error(missing, 400)["message"]
    assert assert_openai_error(unknown, 400)["param"] == "apportion.process_scorer"


async def test_sampling_fields_reach_the_algorithm_and_unset_ones_are_the_servers():
    lm = backend()
    options = ServeOptions(sampling=SamplingOptions(temperature=0.6, top_p=0.9, max_tokens=100))
    async with client(algorithm_app(lm, options)) as c:
        given = await c.post("/v1/chat/completions", json=chat(
            apportion={"algorithm": "sc", "budget": 2}, temperature=0.3, top_p=0.5, max_completion_tokens=20,
            stop=["\n\n"], seed=42))
        unset = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}))
    assert given.status_code == unset.status_code == 200
    first, second = lm.calls
    assert (first.params.temperature, first.params.top_p, first.params.max_tokens, first.params.stop) == \
        (0.3, 0.5, 20, ("\n\n",))
    assert first.params.seed is not None and given.json()["apportion"]["seed"] == 42
    assert (second.params.temperature, second.params.top_p, second.params.max_tokens) == (0.6, 0.9, 100)
    assert second.params.seed is None


async def test_a_chat_gets_the_algorithms_instruction_unless_it_has_a_system_message():
    lm = backend()
    own = [{"role": "system", "content": "Be terse."}, *QUESTION]
    async with client(algorithm_app(lm)) as c:
        await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 1}))
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": own,
                                                    "apportion": {"algorithm": "sc", "budget": 1}})
        await c.post("/v1/chat/completions", json=chat())  # a plain call: the messages as sent
    instructed, kept, plain = (call.prompt.messages for call in lm.calls)
    assert instructed[0].role == "system" and "The answer is N" in instructed[0].content
    assert [m.content for m in kept] == ["Be terse.", "What is 3 + 4?"]
    assert [m.role for m in plain] == ["user"]


async def test_logprobs_are_the_chosen_candidates():
    lm = ScriptedBackend([Reply("The answer is 7.", logprob=-0.5)], model=MODEL)
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}, logprobs=True))
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [t["logprob"] for t in content] == [-0.5] * 4


async def test_n_above_one_and_ignore_eos_are_refused_under_an_algorithm():
    lm = backend()
    async with client(algorithm_app(lm)) as c:
        n = await c.post("/v1/chat/completions", json=chat(n=3, apportion={"algorithm": "sc"}))
        eos = await c.post("/v1/chat/completions", json=chat(ignore_eos=True, apportion={"algorithm": "sc"}))
    error = assert_openai_error(n, 400)
    assert error["param"] == "n" and "draws its own samples" in error["message"]
    assert assert_openai_error(eos, 400)["param"] == "ignore_eos"
    assert not lm.calls


async def test_without_an_algorithm_a_request_is_one_metered_backend_call():
    lm = backend("7", "8")
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(n=2, temperature=0.2, max_tokens=30))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == replies("7", "8")
    [call] = lm.calls
    assert call.params == SamplingParams(n=2, max_tokens=30, temperature=0.2, top_p=1.0)
    assert body["apportion"]["algorithm"] is None
    assert body["usage"]["total_tokens"] == body["apportion"]["spent"]["total_tokens"] > 0


async def test_completions_run_algorithms_on_raw_prompts():
    lm = backend()
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/completions", json={"model": "sc-3/m", "prompt": "3 + 4 =", "max_tokens": 30})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "Adding them. The answer is 7." and body["apportion"]["answer"] == "7"
    assert lm.calls[0].prompt == Prompt.raw("3 + 4 =")


async def test_a_budget_over_the_servers_maximum_is_refused_naming_the_limit_and_unset_units_take_it():
    options = ServeOptions(max_budget=Budget(generations=16, total_tokens=5000))
    lm = backend()
    async with client(algorithm_app(lm, options)) as c:
        over = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": {"gen": 17}}))
        within = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}))
    error = assert_openai_error(over, 400)
    assert error["code"] == "budget_too_large" and "generations 17 > 16" in error["message"]
    assert within.json()["apportion"]["budget"] == {"generations": 2, "total_tokens": 5000}
    assert len(lm.calls) == 1


async def test_a_backend_failure_is_a_502_with_what_the_run_spent():
    lm = ScriptedBackend([Reply("x", error=BackendError("the model crashed"))], model=MODEL)
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}))
    error = assert_openai_error(r, 502)
    assert "the model crashed" in error["message"]
    assert r.json()["apportion"]["spent"]["generations"] == 0


# -- bad input -------------------------------------------------------------------------------------


def _body(**kw: Any) -> bytes:
    return json.dumps(chat(**kw)).encode()


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"model": "m", "messages": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("invalid UTF-8", b'{"model": "\xff"}', 400, "not valid JSON"),
    ("nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    ("missing messages", json.dumps({"model": MODEL}).encode(), 400, "messages is required"),
    ("messages not a list", json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages must be"),
    ("temperature as text", _body(temperature="hot"), 400, "temperature must be a number"),
    ("model not a string", json.dumps({"model": 5, "messages": QUESTION}).encode(), 400, "model must be a string"),
    ("apportion not an object", _body(apportion="sc"), 400, "apportion must be an object"),
    ("apportion unknown field", _body(apportion={"algorithm": "sc", "budgets": 3}), 400, "unknown field(s): budgets"),
    ("no algorithm", _body(apportion={"budget": 3}), 400, "apportion.algorithm is required"),
    ("unknown algorithm", _body(apportion={"algorithm": "magic"}), 400, "unknown algorithm 'magic'"),
    ("algorithm not text", _body(apportion={"algorithm": 3}), 400, "apportion.algorithm must be"),
    ("negative budget", _body(apportion={"algorithm": "sc", "budget": {"gen": -2}}), 400, "must be > 0"),
    ("zero budget", _body(apportion={"algorithm": "sc", "budget": 0}), 400, "must be > 0"),
    ("absurd budget", _body(apportion={"algorithm": "sc", "budget": {"gen": 10**12}}), 400, "maximum per request"),
    ("absurd tokens", _body(apportion={"algorithm": "sc", "budget": "tokens=1e30"}), 400, "maximum per request"),
    ("fractional generations", _body(apportion={"algorithm": "sc", "budget": 2.5}), 400, "whole number"),
    ("budget a boolean", _body(apportion={"algorithm": "sc", "budget": True}), 400, "apportion.budget"),
    ("budget a list", _body(apportion={"algorithm": "sc", "budget": [8]}), 400, "apportion.budget"),
    ("budget unit unknown", _body(apportion={"algorithm": "sc", "budget": {"bananas": 3}}), 400,
     "unknown budget unit 'bananas'"),
    ("budget value text", _body(apportion={"algorithm": "sc", "budget": {"gen": "8"}}), 400, "must be a number"),
    ("empty budget", _body(apportion={"algorithm": "sc", "budget": {}}), 400, "at least one limit"),
    ("unknown stop rule", _body(apportion={"algorithm": "sc", "stop": "never"}), 400, "apportion.stop"),
    ("unknown setting", _body(apportion={"algorithm": "debate", "settings": {"wings": 2}}), 400, "no setting 'wings'"),
    ("setting of a wrong type", _body(apportion={"algorithm": "debate", "settings": {"rounds": "many"}}), 400,
     "rounds must be"),
    ("settings not an object", _body(apportion={"algorithm": "sc", "settings": ["rounds=1"]}), 400,
     "apportion.settings must be"),
    ("unknown scorer", _body(apportion={"algorithm": "bon", "scorer": "vibes"}), 400, "unknown scorer 'vibes'"),
    ("candidates not a boolean", _body(apportion={"algorithm": "sc", "candidates": "yes"}), 400,
     "apportion.candidates must be true or false"),
    ("unsupported parameter", _body(presence_penalty=0.5), 400, "unsupported parameter(s): presence_penalty"),
    ("stream_options wrong", _body(stream=True, stream_options=[1]), 400, "stream_options must be an object"),
    ("prefix of zero", json.dumps({"model": "sc-0/m", "messages": QUESTION}).encode(), 400, "must be > 0"),
    ("oversize body", _body(padding="x" * 5000), 413, "larger than this server's limit of 4096 bytes"),
]


@pytest.mark.parametrize(("case", "raw", "status", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_bodies_get_a_4xx_naming_the_problem_and_nothing_runs(case, raw, status, message):
    lm = backend()
    recorder = Recorder()
    options = ServeOptions(max_body_bytes=4096 if case == "oversize body" else 1 << 20)
    async with client(algorithm_app(lm, options, observers=[recorder])) as c:
        r = await c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = assert_openai_error(r, status)
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert not lm.calls
    [finished] = recorder.finished
    assert (finished.status, finished.outcome, finished.spent.generations) == (status, "refused", 0)
    assert not recorder.started


async def test_an_oversize_body_without_a_length_header_is_cut_off_while_read():
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 1000

    async with client(algorithm_app(backend(), ServeOptions(max_body_bytes=10_000))) as c:
        r = await c.post("/v1/chat/completions", content=chunks())
    assert assert_openai_error(r, 413)["code"] == "request_too_large"


def test_server_options_are_checked():
    with pytest.raises(ConfigError, match="exceeds the maximum"):
        ServeOptions(default_budget=Budget(generations=100))
    with pytest.raises(ConfigError, match="unknown scorer"):
        ServeOptions(scorer="vibes")
    with pytest.raises(ConfigError, match="not among those offered"):
        algorithm_app(backend(), ServeOptions(process_scorer="prm"))


# -- streaming ---------------------------------------------------------------------------------------


async def test_a_stream_sends_interim_results_then_the_answer_as_deltas():
    lm = backend("7", "8", "7", "7")  # rounds of two: 7 8, then 7 7 (esc stops: unanimous window)
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(
            stream=True, stream_options={"include_usage": True},
            apportion={"algorithm": "sc", "budget": 8, "stop": "esc:window=2"}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    interim = [c["apportion"] for c in chunks if "apportion" in c and not c["apportion"].get("final", True)]
    assert [i["drawn"] for i in interim] == [2, 4]  # one per round
    assert [i["spent"]["generations"] for i in interim] == [2, 4] and interim[0]["answer"] == "7"
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert "".join(x for x in content if x) == "Adding them. The answer is 7."
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["apportion"]["stop_reason"] == "esc" and finish["apportion"]["answer"] == "7"
    assert all(c["usage"] is None for c in chunks[:-1])
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == finish["apportion"]["spent"]["total_tokens"]
    assert len(lm.calls) == 2


async def test_a_stream_refused_at_its_start_is_an_ordinary_error_response():
    lm = ScriptedBackend([Reply("x", error=BackendError("the model crashed"))], model=MODEL)
    async with client(algorithm_app(lm)) as c:
        r = await c.post("/v1/chat/completions", json=chat(stream=True, apportion={"algorithm": "sc", "budget": 2}))
        tiny = await c.post("/v1/chat/completions", json=chat(
            stream=True, apportion={"algorithm": "sc", "budget": {"tokens": 3}}))
    assert_openai_error(r, 502)
    assert assert_openai_error(tiny, 400)["code"] == "budget_too_small"


async def test_a_plain_call_streams_too():
    async with client(algorithm_app(backend("7", "8"))) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "3 + 4 =", "n": 2, "stream": True})
    chunks = events(r.text)[:-1]
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: replies("7")[0], 1: replies("8")[0]}
    assert chunks[-1]["apportion"]["algorithm"] is None


# -- keys and quotas ---------------------------------------------------------------------------------


KEY = KeyInfo("key-1", "alice")
CAPPED = KeyInfo("key-2", "bob", max_request=Budget(generations=4, total_tokens=800))


def keyed(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def test_with_quotas_nothing_runs_without_a_valid_key():
    lm = backend()
    quota = FakeQuota({"s1": KEY})
    async with client(algorithm_app(lm, quota=quota)) as c:
        missing = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc"}))
        wrong = await c.post("/v1/chat/completions", json=chat(), headers=keyed("s2"))
        models = await c.get("/v1/models")
        health = await c.get("/health")
        ok = await c.get("/v1/models", headers=keyed("s1"))
    assert assert_openai_error(missing, 401)["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "no such key" in assert_openai_error(wrong, 401)["message"]
    assert_openai_error(models, 401)
    assert health.status_code == ok.status_code == 200
    assert not lm.calls and not quota.grants


async def test_a_request_reserves_its_worst_case_runs_within_the_grant_and_settles_what_it_spent():
    lm = backend()
    quota = FakeQuota({"s1": KEY}, tokens_left=300)
    async with client(algorithm_app(lm, quota=quota)) as c:
        spec = {"algorithm": "sc", "budget": {"gen": 8, "tokens": 4000}}
        r = await c.post("/v1/chat/completions", json=chat(apportion=spec), headers=keyed("s1"))
    body = r.json()
    [(request_id, want)] = quota.wants.items()
    assert request_id == body["id"]
    assert want == Charge(tokens=4000, usd=Fraction(0), requests=1)
    assert body["apportion"]["budget"] == {"generations": 8, "total_tokens": 300}  # the grant bound the run
    assert quota.settled[request_id] == Charge(body["usage"]["total_tokens"], Fraction(0), 1)
    assert body["usage"]["total_tokens"] <= 300


async def test_without_a_token_limit_the_server_default_bounds_the_reservation():
    quota = FakeQuota({"s1": KEY})
    options = ServeOptions(max_budget=None, max_request_tokens=1234)
    async with client(algorithm_app(backend(), options, quota=quota)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}),
                         headers=keyed("s1"))
    assert [w.tokens for w in quota.wants.values()] == [1234]
    assert r.json()["apportion"]["budget"] == {"generations": 2, "total_tokens": 1234}


async def test_a_plain_call_reserves_only_its_own_worst_case():
    lm = backend()
    quota = FakeQuota({"s1": KEY})
    async with client(algorithm_app(lm, quota=quota)) as c:
        await c.post("/v1/chat/completions", json=chat(n=2, max_tokens=10), headers=keyed("s1"))
    prompt_tokens = await lm.prompt_tokens(lm.calls[0].prompt)
    assert [w.tokens for w in quota.wants.values()] == [prompt_tokens + 2 * 10]


async def test_the_keys_maximum_caps_the_budget():
    lm = backend()
    quota = FakeQuota({"s2": CAPPED})
    async with client(algorithm_app(lm, quota=quota)) as c:
        over = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 5}),
                            headers=keyed("s2"))
        within = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 3}),
                              headers=keyed("s2"))
    error = assert_openai_error(over, 400)
    assert "this key's maximum" in error["message"] and "generations 5 > 4" in error["message"]
    assert within.json()["apportion"]["budget"] == {"generations": 3, "total_tokens": 800}
    assert [w.tokens for w in quota.wants.values()] == [800]


async def test_an_exceeded_quota_is_a_429_with_retry_after_and_nothing_runs():
    lm = backend()
    resets = datetime.now(UTC) + timedelta(seconds=90)
    quota = FakeQuota({"s1": KEY}, exceeded=QuotaExceeded("daily token quota of alice is used up; it resets at "
                                                          "midnight UTC", quota="tokens", resets_at=resets))
    async with client(algorithm_app(lm, quota=quota)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc"}), headers=keyed("s1"))
    error = assert_openai_error(r, 429)
    assert "daily token quota" in error["message"] and error["code"] == "tokens_quota_exceeded"
    assert 85 <= int(r.headers["retry-after"]) <= 90
    assert not lm.calls and not quota.settled


async def test_dollars_are_reserved_at_the_price_and_a_smaller_dollar_grant_binds_the_run():
    price = Price(input_per_mtok=1.0, output_per_mtok=3.0)
    quota = FakeQuota({"s1": KEY}, usd_left=Fraction(1, 1000))
    lm = backend(price=price)
    async with client(algorithm_app(lm, quota=quota)) as c:
        spec = {"algorithm": "sc", "budget": {"gen": 2, "tokens": 2000}}
        r = await c.post("/v1/chat/completions", json=chat(apportion=spec), headers=keyed("s1"))
    [want] = quota.wants.values()
    assert want.usd == 2000 * Fraction(3, 1_000_000)  # every token at the dearer price: the worst case
    budget = r.json()["apportion"]["budget"]
    assert budget["usd"] <= 0.001 and Fraction(repr(budget["usd"])) <= Fraction(1, 1000)
    [settled] = quota.settled.values()
    assert settled.usd == price.cost(r.json()["usage"]["prompt_tokens"], r.json()["usage"]["completion_tokens"])


async def test_a_budget_that_cannot_bind_is_refused_before_anything_is_reserved():
    quota = FakeQuota({"s1": KEY})
    async with client(algorithm_app(backend(), quota=quota)) as c:  # the scripted model is free
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": {"usd": 0.01}}),
                         headers=keyed("s1"))
    assert "it has no price" in assert_openai_error(r, 400)["message"]
    assert not quota.grants


async def test_a_failed_run_is_settled_too():
    lm = ScriptedBackend([Reply("x", error=BackendError("the model crashed"))], model=MODEL)
    quota = FakeQuota({"s1": KEY})
    async with client(algorithm_app(lm, quota=quota)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc"}), headers=keyed("s1"))
    assert r.status_code == 502
    [settled] = quota.settled.values()
    assert settled.requests == 1 and settled.tokens == 0


# -- observers ---------------------------------------------------------------------------------------


async def test_observers_hear_of_each_request_and_one_that_fails_harms_nothing():
    class Broken:
        def request_started(self, event: RequestStarted) -> None:
            raise RuntimeError("observer bug")

        def request_finished(self, event: RequestFinished) -> None:
            raise RuntimeError("observer bug")

    recorder = Recorder()
    async with client(algorithm_app(backend(), observers=[Broken(), recorder])) as c:
        ok = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}))
        await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "magic"}))
    assert ok.status_code == 200
    [started] = recorder.started
    assert (started.algorithm, started.budget.generations, started.stream) == ("self-consistency", 2, False)
    done, refused = recorder.finished
    assert (done.status, done.outcome, done.spent.generations, done.request_id) == (200, "ok", 2, ok.json()["id"])
    assert done.latency_s > 0 and done.budget == started.budget
    assert (refused.status, refused.outcome, refused.algorithm) == (400, "refused", None)


# -- on real sockets ---------------------------------------------------------------------------------


def test_the_openai_client_reads_responses_streams_and_errors_unchanged():
    lm = backend("7", "8", "7", "7")
    with ServedApp(algorithm_app(lm)) as served:
        api = openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0)
        response = api.chat.completions.create(model="sc-4/m", messages=QUESTION, temperature=0.5)
        assert response.choices[0].message.content == "Adding them. The answer is 7."
        extra = response.model_extra or {}
        assert extra["apportion"]["answer"] == "7"
        assert response.usage is not None and response.usage.total_tokens == extra["apportion"]["spent"]["total_tokens"]

        stream = api.chat.completions.create(
            model=MODEL, messages=QUESTION, stream=True, stream_options={"include_usage": True},
            extra_body={"apportion": {"algorithm": "sc", "budget": 8, "stop": "esc:window=2"}})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Adding them. The answer is 7."
        interim = [(c.model_extra or {})["apportion"] for c in chunks if "apportion" in (c.model_extra or {})]
        assert interim[0]["final"] is False and interim[-1]["final"] is True
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == interim[-1]["spent"]["total_tokens"]

        completion = api.completions.create(model="sc-2/m", prompt="3 + 4 =", max_tokens=30)
        assert completion.choices[0].text == "Adding them. The answer is 7."

        with pytest.raises(openai.BadRequestError, match="draws its own samples"):
            api.chat.completions.create(model="sc-4/m", messages=QUESTION, n=2)
        models = api.models.list()
        assert [m.id for m in models] == [MODEL]


def _slow_backend() -> ScriptedBackend:
    # Never unanimous in a window of two, so esc never stops it: only the budget or a disconnect does.
    return ScriptedBackend(replies("7", "8"), model=MODEL, latency_s=0.2)


def _assert_work_stopped(lm: ScriptedBackend, recorder: Recorder, quota: FakeQuota) -> RequestFinished:
    assert recorder.done.wait(10), "the server never closed the request"
    calls = len(lm.calls)
    time.sleep(0.6)  # three backend latencies: any call still going would have been made by now
    assert len(lm.calls) == calls
    [finished] = recorder.finished
    assert finished.outcome == "cancelled"
    assert finished.spent.generations < 40
    [settled] = quota.settled.values()
    assert settled.tokens == finished.spent.total_tokens  # the ledger's last word is what was charged
    return finished


def test_a_client_that_disconnects_mid_stream_cancels_the_run():
    lm, recorder = _slow_backend(), Recorder()
    quota = FakeQuota({"s1": KEY})
    with ServedApp(algorithm_app(lm, quota=quota, observers=[recorder])) as served:
        body = chat(stream=True, apportion={"algorithm": "sc", "budget": 40, "stop": "esc:window=2"})
        with httpx.Client(timeout=10) as http, \
                http.stream("POST", f"{served.base_url}/chat/completions", json=body, headers=keyed("s1")) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"apportion"' in line:
                    break  # an interim result: the run is under way; now hang up
        finished = _assert_work_stopped(lm, recorder, quota)
        assert finished.stream and finished.spent.generations >= 2


def test_a_client_that_gives_up_waiting_cancels_the_run():
    lm, recorder = _slow_backend(), Recorder()
    quota = FakeQuota({"s1": KEY})
    with ServedApp(algorithm_app(lm, quota=quota, observers=[recorder])) as served:
        body = chat(apportion={"algorithm": "sc", "budget": 40, "stop": "esc:window=2"})
        with httpx.Client(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
            http.post(f"{served.base_url}/chat/completions", json=body, headers=keyed("s1"))
        finished = _assert_work_stopped(lm, recorder, quota)
        assert finished.status == 499 and not finished.stream


async def test_concurrent_requests_each_get_their_own_run():
    lm = backend(latency_s=0.05)
    async with client(algorithm_app(lm)) as c:
        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(
            apportion={"algorithm": "sc", "budget": 3})) for _ in range(8)))
    assert all(r.status_code == 200 for r in rs)
    assert len({r.json()["id"] for r in rs}) == 8
    assert sum(r.json()["apportion"]["spent"]["generations"] for r in rs) == 24


async def test_a_store_that_cannot_answer_is_a_503_and_nothing_runs():
    from apportion.serve.quota_contract import QuotaStoreFailed

    class Down(FakeQuota):
        def __init__(self, keys: dict[str, KeyInfo], at: str) -> None:
            super().__init__(keys)
            self.at = at

        async def authenticate(self, secret: str) -> KeyInfo:
            if self.at == "authenticate":
                raise QuotaStoreFailed("database is locked")
            return await super().authenticate(secret)

        async def reserve(self, key: KeyInfo, request_id: str, want: Charge) -> Charge:
            raise QuotaStoreFailed("connection refused")

    for at, message in (("authenticate", "database is locked"), ("reserve", "connection refused")):
        lm = backend()
        async with client(algorithm_app(lm, quota=Down({"s1": KEY}, at))) as c:
            r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc"}), headers=keyed("s1"))
        error = assert_openai_error(r, 503)
        assert error["code"] == "quota_store_unavailable" and message in error["message"]
        assert r.headers["retry-after"] == "5" and not lm.calls


async def test_a_grant_too_small_to_pay_for_one_sample_is_the_quota_s_429():
    lm = backend()
    quota = FakeQuota({"s1": KEY}, tokens_left=5)
    async with client(algorithm_app(lm, quota=quota)) as c:
        r = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 2}),
                         headers=keyed("s1"))
    error = assert_openai_error(r, 429)
    assert error["code"] == "quota_too_small" and error["message"].startswith("the key's quota had 5 tokens left")
    assert not lm.calls and list(quota.settled.values()) == [Charge(0, Fraction(0), 1)]


async def test_free_form_chat_votes_whole_replies_never_a_number_in_the_prose():
    """apportion.answers = "text": replies compared whole (normalised), so the majority reply wins
    though a number in another reply's prose would win a math vote; the message is the reply as written."""
    lm = ScriptedBackend(["I'd call the cat Mochi.", "i'd call the cat mochi", "Maybe 3: Tom.", "Maybe 3, Tom",
                          "Call it 3 Tom"], model=MODEL)
    async with client(algorithm_app(lm)) as c:
        text = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "budget": 5,
                                                                           "answers": "text"}))
        bad = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "sc", "answers": "vibes"}))
        forcing = await c.post("/v1/chat/completions", json=chat(apportion={"algorithm": "budget-forcing",
                                                                              "answers": "text"}))
    body = text.json()
    assert body["choices"][0]["message"]["content"] == "I'd call the cat Mochi."
    assert body["apportion"]["answer"] == "i'd call the cat mochi"
    assert "unknown answer mode 'vibes'" in assert_openai_error(bad, 400)["message"]
    assert "free-form answers" in assert_openai_error(forcing, 400)["message"]
