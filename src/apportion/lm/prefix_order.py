"""Send requests that share a long prompt prefix in an order that lets a server's prefix cache hit.

Servers that batch (vLLM's automatic prefix caching, SGLang's radix cache, llama.cpp's slots
with ``cache_prompt``) reuse the key-value cells of a prompt prefix they have already computed.
They can only do that once the first request's prefill has computed it: requests that share a
long prefix and arrive at the same instant all prefill it, each on its own. So a request whose
prompt shares at least ``min_chars`` characters with a request already sent, but not yet likely
prefilled, is held back until that leader completes or has been on the wire for ``hold_s``
seconds, whichever comes first. Requests that share nothing are never held, and a burst keeps
its order: leaders go out at once, the followers of one leader are released together, in the
order they were submitted.

The added wait is bounded: ``hold_s`` after the leader is sent (or less: its completion, the
request's own deadline). A leader that is still waiting for a free connection holds its
followers until it gets one; they would have queued behind it for a connection anyway. A held
request takes no connection while it waits, and cancelling it (``asyncio`` cancellation) takes
it out at once and releases whatever waited on it.

Shares are measured in characters of what the server reads (``server_view``): the chat messages
in order (system, user, ...), then the open assistant turn and its prefix, so continuations of
one question by different assistant prefixes (search paths) share the question. A request is
held only for what waiting would gain: the part of its prompt shared with an unready request
beyond what it shares with requests already prefilled (sent ``hold_s`` ago, or done: the last
``history`` distinct prompts are remembered as cached) must reach ``min_chars``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from apportion.errors import ConfigError
from apportion.lm.base import Prompt

DEFAULT_MIN_CHARS = 512
"""About 128 tokens (English text runs at about four characters a token): eight of vLLM's
16-token cache blocks. A shorter shared prefix saves milliseconds of prefill, less than a hold."""
DEFAULT_HOLD_S = 0.2
"""A batching GPU server prefills thousands to tens of thousands of tokens a second, so a shared
prefix of a few thousand tokens is computed within a few tenths of a second of its arrival; a
reply that decodes hundreds of tokens takes seconds, so holding the followers 0.2 s more costs
them a few percent of their latency and saves each the prefix's prefill."""
DEFAULT_HISTORY = 64


def server_view(prompt: Prompt) -> str:
    """The prompt as a server reads it, for measuring shared prefixes: each chat message in order
    (role, then content), then the open assistant turn with its prefix; or the raw text and its
    prefix. Two prompts share a prefix here where the server's token sequences do, up to the
    template's own markers."""
    if prompt.is_chat:
        head = "".join(f"\x1e{m.role}\x1f{m.content}" for m in prompt.messages) + "\x1eassistant\x1f"
    else:
        head = prompt.text or ""
    return head + prompt.assistant_prefix


def common_prefix_len(a: str, b: str) -> int:
    """Length of the longest common prefix, in linear time with the comparisons done in C."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Ticket:
    """One request's place in the order, from ``PrefixOrder.enter`` to ``PrefixOrder.leave``.
    ``leader`` is the request it waits for (None: it is sent at once), ``shared`` the characters
    it shares with that leader."""

    __slots__ = ("_order", "_ready", "_timer", "done", "leader", "sent_at", "shared", "text")

    def __init__(self, order: PrefixOrder, text: str, leader: Ticket | None, shared: int) -> None:
        self.text = text
        self.leader = leader
        self.shared = shared
        self.sent_at: float | None = None
        self.done = False
        self._order = order
        self._ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def sent(self) -> None:
        """The request went out (it holds a connection): its prefill starts. Later calls (a
        retry) change nothing."""
        if self.sent_at is not None or self.done:
            return
        self.sent_at = self._order.clock()
        hold = self._order.hold_s
        if len(self.text) < self._order.min_chars:  # nothing can wait for it
            return
        if hold <= 0:
            self._ready.set()
            return
        with contextlib.suppress(RuntimeError):  # no running loop: a synchronous test of the rules
            self._timer = asyncio.get_running_loop().call_later(hold, self._ready.set)

    def ready(self, now: float | None = None) -> bool:
        """Likely prefilled: done, or sent ``hold_s`` ago."""
        if self.done:
            return True
        if self.sent_at is None:
            return False
        return (self._order.clock() if now is None else now) - self.sent_at >= self._order.hold_s


class PrefixOrder:
    """Decides which requests wait for which (``enter``), and holds them (``admit``). One per
    event loop: its events belong to the loop that waits on them."""

    def __init__(self, *, min_chars: int = DEFAULT_MIN_CHARS, hold_s: float = DEFAULT_HOLD_S,
                 history: int = DEFAULT_HISTORY, clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 1:
            raise ConfigError(f"prefix_share_min_chars must be an integer >= 1, got {min_chars!r}")
        if not (isinstance(hold_s, (int, float)) and 0 <= hold_s < float("inf")):
            raise ConfigError(f"prefix_hold_s must be a number of seconds >= 0, got {hold_s!r}")
        self.min_chars = min_chars
        self.hold_s = float(hold_s)
        self.clock = clock
        self._history = history
        self._live: dict[str, list[Ticket]] = {}
        """Requests entered and not yet left, by their first min_chars characters, in order."""
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.held = 0
        """Requests held so far."""
        self.held_s = 0.0
        """Seconds they were held, in all."""

    def enter(self, text: str) -> Ticket:
        """Register a request about to be sent and choose its leader: the earliest registered
        request not yet likely prefilled whose share with this one, beyond what this one shares
        with requests already prefilled, is at least ``min_chars`` (a later one only where it
        shares ``min_chars`` more)."""
        m = self.min_chars
        if len(text) < m:  # too short to share min_chars with anything: never held, never waited for
            return Ticket(self, text, None, 0)
        head = text[:m]
        group = self._live.setdefault(head, [])
        now = self.clock()
        leader, shared, cached = None, 0, 0
        pending: list[tuple[Ticket, int]] = []
        for t in group:
            share = common_prefix_len(text, t.text)
            if t.ready(now):
                cached = max(cached, share)
            else:
                pending.append((t, share))
        if pending:
            for seen in self._seen:
                if seen.startswith(head):
                    cached = max(cached, common_prefix_len(text, seen))
            for t, share in pending:
                if share - cached >= m and (leader is None or share >= shared + m):
                    leader, shared = t, share
        ticket = Ticket(self, text, leader, shared)
        group.append(ticket)
        return ticket

    @property
    def in_flight(self) -> int:
        """Requests entered and not yet left (held, waiting for a connection, or sent), of those
        long enough to share ``min_chars`` with another."""
        return sum(len(group) for group in self._live.values())

    def leave(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or cancelled): release what waits on it, and
        remember its prompt as cached if it was sent."""
        if ticket.done:
            return
        ticket.done = True
        ticket._ready.set()
        if ticket._timer is not None:
            ticket._timer.cancel()
        if len(ticket.text) < self.min_chars:
            return
        head = ticket.text[:self.min_chars]
        group = self._live.get(head, [])
        with contextlib.suppress(ValueError):
            group.remove(ticket)
        if not group:
            self._live.pop(head, None)
        if ticket.sent_at is not None:
            self._seen[ticket.text] = None
            self._seen.move_to_end(ticket.text)
            while len(self._seen) > self._history:
                self._seen.popitem(last=False)

    async def wait(self, ticket: Ticket, deadline: float | None = None) -> float:
        """Hold ``ticket`` until its leader is likely prefilled, or until ``deadline``
        (time.monotonic); the seconds held."""
        leader = ticket.leader
        if leader is None or leader.ready():
            return 0.0
        started = time.monotonic()
        timeout = None if deadline is None else max(0.0, deadline - started)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await leader._ready.wait()
        waited = time.monotonic() - started
        self.held += 1
        self.held_s += waited
        return waited

    @contextlib.asynccontextmanager
    async def admit(self, text: str, deadline: float | None = None) -> AsyncIterator[Ticket]:
        """``enter``, ``wait``, then the request (call ``ticket.sent()`` when it goes out),
        then ``leave``, whatever happens, cancellation included."""
        ticket = self.enter(text)
        try:
            await self.wait(ticket, deadline)
            yield ticket
        finally:
            self.leave(ticket)
