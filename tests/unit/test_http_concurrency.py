"""Concurrent requests over HTTP: bounded connections, and requests that share a long prefix sent
leader first (``prefix_order``), against a real server on 127.0.0.1 that records when each
request arrived and how many were in flight at once."""

import asyncio
import time

import pytest

from apportion import HTTPOptions, OpenAIHTTPBackend, Prompt, SamplingParams
from tests.support.fake_openai import FakeOpenAI

CONTEXT = "A farmer keeps records of every animal on the farm. " * 20  # about 1,000 characters
QUESTION = Prompt.chat(CONTEXT + "How many legs do the cows have?", system="Solve the problem briefly.")
PARAMS = SamplingParams(max_tokens=16)


def backend(server: FakeOpenAI, **kw) -> OpenAIHTTPBackend:
    options = {"base_url": server.base_url, "model": server.model, "timeout_s": 10.0, "native_n": True, **kw}
    return OpenAIHTTPBackend(HTTPOptions(**options))


def unrelated(i: int) -> Prompt:
    return Prompt.chat(f"Question {i}: " + f"a different story number {i}. " * 40)


def path_of(body: dict) -> str:
    """Which request a body is: its assistant prefix, or its first user words."""
    last = body["messages"][-1]
    return last["content"] if last["role"] == "assistant" else last["content"][:12]


async def burst(lm: OpenAIHTTPBackend, prompts: list[Prompt]) -> float:
    started = time.monotonic()
    await asyncio.gather(*(lm.generate(p, PARAMS) for p in prompts))
    await lm.aclose()
    return started


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_concurrent_requests_run_together_up_to_max_concurrency_and_never_more(limit):
    with FakeOpenAI(delay_s=0.3) as server:
        lm = backend(server, max_concurrency=limit)
        started = await burst(lm, [unrelated(i) for i in range(10)])
        elapsed = time.monotonic() - started
        assert server.peak_in_flight == limit
        rounds = -(-10 // limit)  # ceil: the requests go in waves of `limit`
        assert elapsed >= rounds * 0.3 - 0.05
        assert server.billing.requests == 10


async def test_a_burst_sharing_a_long_prefix_arrives_leader_first_and_followers_after_its_hold():
    with FakeOpenAI(delay_s=1.5) as server:
        lm = backend(server, prefix_hold_s=0.4)
        paths = [QUESTION.continued(f"Path {i}: ") for i in range(8)]
        others = [unrelated(i) for i in range(3)]
        started = await burst(lm, [paths[0], others[0], *paths[1:4], others[1], *paths[4:], others[2]])
        at = {path_of(b): t - started for b, t in zip(server.billing.bodies, server.arrivals, strict=True)}
        leader = at["Path 0: "]
        followers = [at[f"Path {i}: "] for i in range(1, 8)]
        assert leader < 0.3
        assert all(at[p.messages[-1].content[:12]] < 0.3 for p in others)  # nothing shared: not held
        # held for prefix_hold_s after the leader was sent (its clock starts when it has a
        # connection, a little before the server reads it), not until it finished (1.5 s)
        assert all(max(leader, 0.35) < t < leader + 1.4 for t in followers), (leader, followers)
        assert server.peak_in_flight == 11  # held, then sent together: the server batches them


async def test_followers_go_as_soon_as_the_leader_is_answered():
    with FakeOpenAI(delay_s=0.3) as server:
        lm = backend(server, prefix_hold_s=20.0)
        started = await burst(lm, [QUESTION.continued(f"Path {i}: ") for i in range(4)])
        at = sorted(t - started for t in server.arrivals)
        assert at[0] < 0.25 and all(at[0] + 0.28 < t < at[0] + 3.0 for t in at[1:]), at
        assert time.monotonic() - started < 5.0


async def test_without_prefix_order_a_burst_arrives_at_once():
    with FakeOpenAI(delay_s=0.5) as server:
        lm = backend(server, prefix_order=False, prefix_hold_s=0.4)
        started = await burst(lm, [QUESTION.continued(f"Path {i}: ") for i in range(8)])
        assert all(t - started < 0.3 for t in server.arrivals)
        assert server.peak_in_flight == 8


async def test_the_bound_holds_with_held_requests_and_holding_takes_no_connection():
    """Three connections: the leader and two unrelated requests take them; the held followers
    take none while held and then share them."""
    with FakeOpenAI(delay_s=0.4) as server:
        lm = backend(server, max_concurrency=3, prefix_hold_s=0.2)
        prompts = [QUESTION.continued("Path 0: "), unrelated(1), unrelated(2),
                   *(QUESTION.continued(f"Path {i}: ") for i in range(1, 6))]
        started = await burst(lm, prompts)
        assert server.peak_in_flight == 3 and server.billing.requests == 8
        at = {path_of(b): t - started for b, t in zip(server.billing.bodies, server.arrivals, strict=True)}
        assert max(at["Path 0: "], at[unrelated(1).messages[-1].content[:12]],
                   at[unrelated(2).messages[-1].content[:12]]) < 0.3


async def test_cancelling_a_held_request_sends_nothing_and_leaves_the_leader_alone():
    with FakeOpenAI(delay_s=0.6) as server:
        lm = backend(server, prefix_hold_s=20.0)
        leader = asyncio.create_task(lm.generate(QUESTION.continued("Path 0: "), PARAMS))
        await asyncio.sleep(0.1)
        held = asyncio.create_task(lm.generate(QUESTION.continued("Path 1: "), PARAMS))
        await asyncio.sleep(0.1)
        assert not held.done()
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        completion = await leader
        assert completion.samples and server.billing.requests == 1
        assert lm._orders.get().in_flight == 0
        await lm.aclose()
