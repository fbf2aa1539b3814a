"""Are two answers the same? One function for voting, best-of-N and grading.

Cheap checks first: normalised text, then exact numbers (with a relative tolerance for decimals
that were rounded). Only answers that are not plain numbers reach math-verify, whose verdicts
are cached per pair.

math-verify guards its own time with SIGALRM, which only works on the main thread. Elsewhere
(a worker thread, the sync wrapper inside a notebook's loop) it must run without its timeouts,
so there we bound its time by only handing it short answers with no towers of exponents.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from fractions import Fraction

from apportion.answers.normalize import normalize_answer, numeric_value

_MV_TIMEOUT_S = 3
_MAX_SYMBOLIC_CHARS = 120


class _QuietTimeoutNotice(logging.Filter):
    """math-verify logs a warning on every call made without its signal timeouts; we bound the
    time ourselves (see module doc), so that notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_FILTER = _QuietTimeoutNotice()


class Equivalence:
    """Decides answer equivalence; keeps a cache, so share one instance per run or dataset."""

    def __init__(self, *, use_math_verify: bool = True, rel_tol: float = 1e-6) -> None:
        self.use_math_verify = use_math_verify
        self.rel_tol = rel_tol
        self._pairs: dict[tuple[str, str], bool] = {}
        self._parsed: dict[str, object] = {}
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()

    # A copy sent to another process (a batch's remote worker) needs a lock of its own; the caches
    # go with it, as their verdicts hold anywhere.
    def __getstate__(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if k != "_lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        vars(self).update(state)
        self._lock = threading.Lock()

    def key(self, answer: str) -> str:
        """A canonical form: equal keys are always equivalent (the converse needs ``same``)."""
        key = self._keys.get(answer)
        if key is None:
            key = self._keys[answer] = normalize_answer(answer)
        return key

    def same(self, a: str, b: str) -> bool:
        ka, kb = self.key(a), self.key(b)
        if ka == kb:
            return True
        va, vb = numeric_value(ka), numeric_value(kb)
        if va is not None and vb is not None:
            return _close(va, vb, self.rel_tol)
        if ka.replace(" ", "").lower() == kb.replace(" ", "").lower():
            return True
        if not self.use_math_verify:
            return False
        pair = (ka, kb) if ka <= kb else (kb, ka)
        with self._lock:
            cached = self._pairs.get(pair)
        if cached is None:
            cached = self._math_verify(*pair)
            with self._lock:
                self._pairs[pair] = cached
        return cached

    def cluster(self, answers: Sequence[str | None]) -> list[int | None]:
        """Class index per answer, numbered in order of first appearance; None stays None."""
        reps: list[str] = []
        floats: list[float | None] = []  # each rep's numeric value, converted once
        by_key: dict[str, int] = {}
        out: list[int | None] = []
        for answer in answers:
            if answer is None:
                out.append(None)
                continue
            k = self.key(answer)
            idx = by_key.get(k)
            if idx is None:
                value = numeric_value(k)
                f = float(value) if value is not None else None
                idx = next((i for i, rep in enumerate(reps) if self._same_as_rep(rep, floats[i], k, f)), None)
                if idx is None:
                    idx = len(reps)
                    reps.append(k)
                    floats.append(f)
                by_key[k] = idx
            out.append(idx)
        return out

    def _same_as_rep(self, rep: str, rep_value: float | None, key: str, value: float | None) -> bool:
        """``same`` for two distinct keys whose numeric values (if any) are known: two numbers
        compare as floats here, as ``_close`` does for unequal Fractions (equal Fractions have
        equal keys), instead of building Fractions again for every pair of a vote."""
        if rep_value is not None and value is not None:
            return math.isclose(rep_value, value, rel_tol=self.rel_tol, abs_tol=0.0)
        return self.same(rep, key)

    def _math_verify(self, a: str, b: str) -> bool:
        if not (_safe(a) and _safe(b)):
            return False
        try:
            from math_verify import parse, verify
        except ImportError:  # pragma: no cover - math-verify is a declared dependency
            return False
        main = threading.current_thread() is threading.main_thread()
        parse_kw = {"parsing_timeout": _MV_TIMEOUT_S if main else None}
        verify_kw = {"timeout_seconds": _MV_TIMEOUT_S if main else None}
        loggers = [logging.getLogger(f"math_verify.{m}") for m in ("parser", "grader")]
        for lg in loggers:
            lg.addFilter(_FILTER)
        try:
            pa, pb = self._parse(a, parse, parse_kw), self._parse(b, parse, parse_kw)
            if not pa or not pb:
                return False
            return bool(verify(pa, pb, **verify_kw))
        except Exception:
            return False
        finally:
            for lg in loggers:
                lg.removeFilter(_FILTER)

    def _parse(self, text: str, parse: object, kw: Mapping[str, object]) -> object:
        with self._lock:
            if text in self._parsed:
                return self._parsed[text]
        parsed = parse(f"${text}$", **kw)  # type: ignore[operator]
        with self._lock:
            self._parsed[text] = parsed
        return parsed


def _close(a: Fraction, b: Fraction, rel_tol: float) -> bool:
    if a == b:
        return True
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0)


def _safe(text: str) -> bool:
    return len(text) <= _MAX_SYMBOLIC_CHARS and text.count("^") <= 2 and "!" not in text
