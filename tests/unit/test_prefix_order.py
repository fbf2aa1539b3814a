"""The prefix order on its own: who waits for whom (a fake clock), then the holding itself."""

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apportion.errors import ConfigError
from apportion.lm.base import Prompt
from apportion.lm.prefix_order import PrefixOrder, common_prefix_len, server_view

M = 100  # min_chars in these tests
LONG = "x" * 300
OTHER = "y" * 300


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def order(**kw) -> tuple[PrefixOrder, Clock]:
    clock = Clock()
    return PrefixOrder(min_chars=M, hold_s=kw.pop("hold_s", 0.2), clock=clock, **kw), clock


@given(st.text("ab", max_size=40), st.text("ab", max_size=40), st.text("ab", max_size=40))
def test_common_prefix_len_is_the_longest_common_prefix(head, a, b):
    x, y = head + a, head + b
    naive = 0
    while naive < min(len(x), len(y)) and x[naive] == y[naive]:
        naive += 1
    assert common_prefix_len(x, y) == naive == common_prefix_len(y, x)


def test_the_view_is_what_the_server_reads_in_order():
    question = Prompt.chat("How many apples? " * 40, system="Be brief.")
    a, b = server_view(question.continued("Count: 3")), server_view(question.continued("Add: 3"))
    shared = common_prefix_len(a, b)
    assert shared > len("How many apples? " * 40)  # continuations share the whole question
    assert a[:shared] == server_view(question)  # ... and the open assistant turn, and no more
    assert a.index("Be brief.") < a.index("How many apples?")  # system, then user
    # the same words as a different role, or in another order, are not the same prompt
    assert server_view(Prompt.chat("Be brief.")) != server_view(Prompt(messages=question.messages[:1]))
    assert server_view(Prompt.raw("abc").continued("d")) == "abcd"


def test_followers_wait_for_the_leader_until_it_is_likely_prefilled():
    po, clock = order()
    leader = po.enter(LONG)
    follower = po.enter(LONG + " path 2")
    unrelated = po.enter(OTHER)
    short = po.enter("x" * (M - 1))  # shares less than min_chars: never held
    assert follower.leader is leader and follower.shared == len(LONG)
    assert unrelated.leader is None and short.leader is None
    # the leader waits for a connection: still not prefilled, later requests wait for it too
    clock.now += 5
    assert po.enter(LONG).leader is leader
    leader.sent()
    clock.now += 0.19
    assert po.enter(LONG).leader is leader
    clock.now += 0.02  # hold_s after it was sent: its prefix is taken as computed
    assert leader.ready() and po.enter(LONG).leader is None


def test_a_finished_leader_is_remembered_as_cached():
    po, _ = order()
    leader = po.enter(LONG)
    leader.sent()
    follower = po.enter(LONG + " more")
    po.leave(leader)
    assert follower.leader is leader and leader.ready()  # done: released before hold_s
    # a request waiting for its connection shares the same prefix as the finished leader:
    # nothing is gained by waiting for it
    assert po.enter(LONG + " again").leader is None
    unsent = po.enter(OTHER)
    po.leave(unsent)  # never sent: the server never saw it, nothing is cached
    pending = po.enter(OTHER + " b")
    assert pending.leader is None  # nothing cached, nothing pending
    assert po.enter(OTHER + " c").leader is pending


def test_a_request_waits_only_for_what_waiting_would_gain():
    po, clock = order()
    question = "q" * 1000
    first = po.enter(question)
    first.sent()
    clock.now += 1  # prefilled
    near = po.enter(question + "s" * (M - 1))  # pending, adds less than min_chars to the cache
    far = po.enter(question + "t" * (2 * M))  # pending, adds 2 * min_chars
    assert near.leader is None and far.leader is None  # both share only the cached question
    assert po.enter(question + "s" * (M - 1) + "more").leader is None
    assert po.enter(question + "t" * (2 * M) + "more").leader is far


def test_the_earliest_leader_is_chosen_unless_a_later_one_gains_min_chars_more():
    po, _ = order()
    first = po.enter(LONG)
    second = po.enter(LONG + "a" * (M - 1))
    third = po.enter(LONG + "b" * M)
    assert second.leader is first and third.leader is first
    assert po.enter(LONG + "a" * (M - 1) + "z").leader is first  # second adds too little
    assert po.enter(LONG + "b" * M + "z").leader is third  # third adds min_chars


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError):
        PrefixOrder(min_chars=0)
    with pytest.raises(ConfigError):
        PrefixOrder(hold_s=-1)


async def run_burst(po: PrefixOrder, texts: list[str], work_s: float, log: list[tuple[str, float]]) -> None:
    """Each text goes through ``admit``, is 'sent' and 'served' for work_s seconds."""

    async def one(i: int, text: str) -> None:
        async with po.admit(text) as ticket:
            log.append((f"send {i}", time.monotonic()))
            ticket.sent()
            await asyncio.sleep(work_s)

    await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))


async def test_a_burst_sends_leaders_first_and_followers_in_submission_order():
    po = PrefixOrder(min_chars=M, hold_s=0.3)
    texts = [LONG + " path 0", OTHER + " a", LONG + " path 1", LONG + " path 2", OTHER + " b", LONG + " path 3"]
    log: list[tuple[str, float]] = []
    started = time.monotonic()
    await run_burst(po, texts, 2.0, log)
    order_sent = [name for name, _ in log]
    # the two leaders (first of each prefix) at once; each one's followers after hold_s, in order
    assert order_sent == ["send 0", "send 1", "send 2", "send 3", "send 5", "send 4"]
    at = {name: t - started for name, t in log}
    assert at["send 0"] < 0.1 and at["send 1"] < 0.1
    assert all(0.25 < at[f"send {i}"] < 1.0 for i in (2, 3, 4, 5))  # released by the hold, not by the 2 s work
    assert po.held == 4 and po.in_flight == 0


async def test_followers_are_released_when_the_leader_finishes_before_the_hold():
    po = PrefixOrder(min_chars=M, hold_s=30.0)
    log: list[tuple[str, float]] = []
    started = time.monotonic()
    await run_burst(po, [LONG + str(i) for i in range(4)], 0.2, log)
    at = {name: t - started for name, t in log}
    assert at["send 0"] < 0.1 and all(0.15 < at[f"send {i}"] < 2.0 for i in (1, 2, 3))


async def test_a_deadline_ends_the_hold():
    po = PrefixOrder(min_chars=M, hold_s=30.0)
    leader = po.enter(LONG)
    leader.sent()
    follower = po.enter(LONG)
    started = time.monotonic()
    held = await po.wait(follower, deadline=started + 0.2)
    assert 0.15 < held < 2.0 and follower.leader is leader


async def test_cancelling_a_held_request_takes_it_out_and_releases_its_own_followers():
    po = PrefixOrder(min_chars=M, hold_s=30.0)
    sent: list[str] = []
    leader = po.enter(LONG)
    leader.sent()

    async def request(name: str, text: str) -> None:
        async with po.admit(text) as ticket:
            sent.append(name)
            ticket.sent()

    held = asyncio.create_task(request("held", LONG + "y" * (2 * M)))
    await asyncio.sleep(0.05)
    behind = asyncio.create_task(request("behind", LONG + "y" * (2 * M) + "z"))  # waits for `held`
    await asyncio.sleep(0.05)
    assert not held.done() and not behind.done()
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    await asyncio.wait_for(behind, 2.0)  # released by the cancellation, not after 30 s
    assert sent == ["behind"] and po.in_flight == 1
    po.leave(leader)
    assert po.in_flight == 0
