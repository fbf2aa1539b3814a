"""Whether a server honours ``n``, decided on evidence and revised as the evidence changes.

One request for n samples costs the prompt once where the server honours ``n`` and the same as a
single-sample request where it does not (it returns one choice), so asking for n is never the
costlier bet on tokens; what a server that ignores ``n`` costs is latency (the missing samples
come in a second round). Hence: batch until the server has answered n > 1 with exactly one
choice several times in a row; then send one request per sample, and probe ``n`` again after a
number of single requests that doubles with each failed probe. One short reply (a server under
load, a transient fault) changes nothing, and a server that honours ``n`` again is batched again.
A reply with more than one choice, fewer than asked, is a server capping ``n``: still batched
(the rest is asked for in the next round).
"""

from __future__ import annotations

import threading

IGNORED_AFTER = 3
"""Replies of one choice to n > 1, in a row, before a server is taken to ignore n."""
FIRST_PROBE = 32
"""Single-sample requests before n is tried again; doubled after each failed probe."""
MAX_PROBE = 1024


class NSupport:
    def __init__(self, forced: bool | None = None) -> None:
        self.forced = forced
        self.ignoring = False
        self._streak = 0
        self._singles = 0
        self._probe_after = FIRST_PROBE
        self._lock = threading.Lock()

    @property
    def batches(self) -> bool:
        """Send n samples as one request now (True until the evidence says otherwise, and on probes)."""
        if self.forced is not None:
            return self.forced
        return not self.ignoring or self._singles >= self._probe_after

    def observe(self, asked: int, got: int) -> str | None:
        """Record one reply; a note when the decision changes."""
        if self.forced is not None:
            return None
        with self._lock:
            if asked == 1:
                self._singles += self.ignoring
                return None
            if got > 1:
                was_ignoring = self.ignoring
                self.ignoring, self._streak, self._singles, self._probe_after = False, 0, 0, FIRST_PROBE
                return "server honoured n again: back to one request per call" if was_ignoring else None
            if got != 1:
                return None  # an empty reply says nothing about n (it is a failure of its own)
            if self.ignoring:  # a probe, answered with one choice again
                if self._singles >= self._probe_after:  # the first of a burst of concurrent probes counts once
                    self._singles, self._probe_after = 0, min(MAX_PROBE, 2 * self._probe_after)
                return None
            self._streak += 1
            if self._streak < IGNORED_AFTER:
                return None
            self.ignoring, self._singles = True, 0
            return (f"server answered n > 1 with one choice {IGNORED_AFTER} times in a row: one request "
                    f"per sample from now on, trying n again after {self._probe_after} requests")
