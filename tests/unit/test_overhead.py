"""The overhead benchmark on a tiny grid, against the real instant server in its own process."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from apportion import Budget, HTTPOptions, OpenAIHTTPBackend, SamplingOptions, make_algorithm
from apportion.answers.extract import read_answer
from apportion.bench.mock_server import InstantBackend, reply_text
from apportion.bench.overhead import (
    MOCK_MODEL,
    REPLY_TOKENS,
    MockServer,
    OverheadConfig,
    bare_body,
    measure,
    table,
    write,
)
from apportion.errors import ConfigError
from apportion.lm.base import Prompt, SamplingParams
from tests.support.fake_openai import FakeOpenAI

CONFIG = OverheadConfig(budgets=(1, 4), concurrencies=(1, 2), questions=4, repeats=1)


@pytest.fixture(scope="module")
def report() -> dict:
    with MockServer() as server:
        url = server.url
        out = asyncio.run(measure(CONFIG, url))
    with pytest.raises(httpx.ConnectError):  # the server process is gone
        httpx.get(f"{url}/v1/models", timeout=2)
    return out


def test_every_cell_is_measured_with_sane_numbers(report):
    assert report["summary"]["mock_honours_n"] is True
    cells = {(c["budget"], c["concurrency"]): c for c in report["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (4, 1), (4, 2)}
    for (budget, _), cell in cells.items():
        assert cell["apportion_s"] > 0 and cell["bare_s"] > 0 and cell["ratio"] > 0
        assert math.isfinite(cell["orchestration_ms_per_generation"])
        assert math.isfinite(cell["orchestration_ms_per_request"])
        assert cell["apportion_cpu_s"] > 0 and cell["bare_cpu_s"] > 0
        # exactly what was asked, on both sides
        assert cell["generations"] == cell["apportion_generations"] == cell["bare_generations"] == 4 * budget
        assert cell["apportion_output_tokens"] == cell["bare_output_tokens"] == 4 * budget * REPLY_TOKENS
        assert len(cell["repeats"]) == 1


def test_self_consistency_sends_exactly_the_bare_requests(report):
    for cell in report["cells"]:
        # counted by the server, one n=b request per question: any extra engine call shows here
        assert cell["apportion_requests"] == cell["bare_requests"] == CONFIG.questions
        run = cell["repeats"][0]
        assert run["apportion"]["served_samples"] == run["bare"]["served_samples"] == cell["generations"]
        assert run["apportion"]["client_calls"] == run["apportion"]["requests"]
        assert all(cell["checks"].values()), cell["checks"]
    assert report["summary"]["checks_passed"] is True


def test_report_is_json_and_a_table(report, tmp_path):
    path = tmp_path / "out" / "overhead.json"
    write(report, path)
    again = json.loads(path.read_text())
    assert again["config"]["budgets"] == [1, 4] and again["config"]["questions"] == 4
    assert set(again["summary"]) >= {"ratio", "orchestration_ms_per_generation", "orchestration_ms_per_request",
                                     "orchestration_cpu_ms_per_request", "by_budget"}
    assert set(again["summary"]["by_budget"]) == {"1", "4"}
    assert all(math.isfinite(c["orchestration_cpu_ms_per_request"]) for c in again["cells"])
    lines = table(report).splitlines()
    assert len(lines) == 2 + 4 and all(line.endswith("| ok |") for line in lines[2:])


async def test_the_bare_client_posts_exactly_what_self_consistency_sends():
    sampling = SamplingOptions(max_tokens=64)
    with FakeOpenAI(model=MOCK_MODEL) as server:
        lm = OpenAIHTTPBackend(HTTPOptions(base_url=server.base_url, model=MOCK_MODEL))
        await make_algorithm("self-consistency", sampling).run(lm, "What is 6 times 7?", Budget(generations=4), seed=9)
        await lm.aclose()
    assert server.billing.bodies == [bare_body("What is 6 times 7?", 4, 9, sampling)]


@pytest.mark.parametrize("kw", [{"budgets": ()}, {"concurrencies": (0,)}, {"questions": 0}, {"max_tokens": 1}])
def test_bad_grids_are_refused(kw):
    with pytest.raises(ConfigError):
        OverheadConfig(**kw)


async def test_the_instant_server_sends_every_sample_its_own_text():
    backend = InstantBackend()
    params = SamplingParams(n=64, max_tokens=64, seed=7, logprobs=True)
    first = await backend.generate(Prompt.chat("q"), params)
    again = await backend.generate(Prompt.chat("another question"), params)
    texts = [s.text for s in first.samples]
    assert len(set(texts)) == 64 and texts == [s.text for s in again.samples]  # distinct, and the seed decides
    assert texts == [reply_text(7, i) for i in range(64)]
    other = await backend.generate(Prompt.chat("q"), SamplingParams(n=64, max_tokens=64, seed=8))
    assert not set(texts) & {s.text for s in other.samples}
    found = [read_answer(t) for t in texts]
    assert all(a is not None for a, _, _ in found)
    assert 3 <= len({a for a, _, _ in found}) < 64  # a vote: answers repeat, and not all agree
    assert len({method for _, _, method in found}) >= 3  # several ways of writing the answer
    assert all(s.output_tokens == REPLY_TOKENS and len(s.logprobs or ()) == REPLY_TOKENS for s in first.samples)
    assert first.usage.output_tokens == 64 * REPLY_TOKENS and other.samples[0].logprobs is None


async def test_the_instant_server_can_still_send_one_fixed_text():
    completion = await InstantBackend(distinct=False).generate(Prompt.chat("q"), SamplingParams(n=3, max_tokens=64))
    assert [s.text for s in completion.samples] == ["The answer is 42."] * 3
