"""Programmatic verifiers as process scorers: any Python callable ``(question, steps)`` that says
whether a prefix of steps is right (run unit tests, check a constraint, check a Game of 24
expression).

The callable returns True/False (1 or 0), a score in [0, 1], or None (no judgement: the prefix
is not something it can check yet). A plain function runs in a worker thread, a coroutine
function on the loop; either gets ``timeout_s`` per prefix, past which the prefix fails (a thread
cannot be stopped: it is abandoned and finishes on its own, so a callable that may hang should
bound itself). A callable that raises fails its prefix; neither failure is cached.

``outcome_only=True`` is for callables that judge finished solutions only: each path is checked
as a whole (its last step, given all before it) and the earlier prefixes that are new in the call
get None without a call. In a step-wise search every prefix was once a path's last step, so it is
still checked once, when it is new; only paths that arrive with several new steps at once skip
the intermediate checks.

Cost: no tokens. Each ``score`` call that runs the callable is one "scorer" call in the ledger
(``budget/metered_call.py``: input-only, zero tokens, no generations), so it is refused past the
run's deadline, cut off at it, and shows in the trace with its latency.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from fractions import Fraction

from apportion.budget.ledger import Ask, Grant
from apportion.budget.metered_call import Metered, metered_call
from apportion.budget.units import Usage
from apportion.errors import BackendError, BackendTimeout, BudgetExhausted, ConfigError
from apportion.lm.metered import MeteredLM
from apportion.reward.process import PrefixOutcome, PrefixScoreCache, Steps, score_paths

VerifierFn = Callable[[str, Sequence[str]], "bool | float | Awaitable[bool | float | None] | None"]


class CallableVerifier:
    """A ``ProcessScorer`` over a Python callable (see the module)."""

    def __init__(self, fn: VerifierFn, *, name: str | None = None, timeout_s: float = 10.0,
                 outcome_only: bool = False, max_concurrency: int = 4,
                 cache: PrefixScoreCache | None = None) -> None:
        if not callable(fn):
            raise ConfigError("a verifier needs a callable (question, steps) -> bool | float | None")
        if not timeout_s > 0 or max_concurrency < 1:
            raise ConfigError("timeout_s > 0 and max_concurrency >= 1 are required")
        self.fn = fn
        self.name: str = name or str(getattr(fn, "__name__", "verifier"))
        self.timeout_s = timeout_s
        self.outcome_only = outcome_only
        self.max_concurrency = max_concurrency
        self.cache = cache if cache is not None else PrefixScoreCache()

    async def score(self, lm: MeteredLM, question: str,
                    paths: Sequence[Sequence[str]]) -> list[list[float | None]]:
        full = {tuple(p) for p in paths}

        async def score_new(prefixes: list[Steps]) -> Mapping[Steps, PrefixOutcome]:
            checked = [p for p in prefixes if not self.outcome_only or p in full]
            out: dict[Steps, PrefixOutcome] = dict.fromkeys(prefixes)  # outcome-only: None unchecked
            if not checked:
                return out

            async def call(grant: Grant) -> Metered[list[PrefixOutcome]]:
                return Metered(await self._check_all(question, checked), Usage())

            try:
                results = await metered_call(lm.ledger, Ask.input_only(0, n=len(checked)), call, model=self.name)
            except BudgetExhausted as exc:
                return {p: exc for p in prefixes}
            out.update(zip(checked, results))
            return out

        return await score_paths(self.cache, question, paths, score_new, scorer=f"verifier {self.name}")

    async def _check_all(self, question: str, prefixes: list[Steps]) -> list[PrefixOutcome]:
        limit = asyncio.Semaphore(self.max_concurrency)

        async def one(steps: Steps) -> PrefixOutcome:
            async with limit:
                return await self._check(question, steps)

        return list(await asyncio.gather(*(one(p) for p in prefixes)))

    async def _check(self, question: str, steps: Steps) -> PrefixOutcome:
        try:
            async with asyncio.timeout(self.timeout_s):
                if inspect.iscoroutinefunction(self.fn):
                    value = await self.fn(question, list(steps))
                else:
                    value = await asyncio.to_thread(self.fn, question, list(steps))
                    if inspect.isawaitable(value):
                        value = await value
        except TimeoutError:
            return BackendTimeout(f"verifier {self.name} gave no verdict within {self.timeout_s:g} s")
        except Exception as exc:
            return BackendError(f"verifier {self.name} raised {type(exc).__name__}: {str(exc)[:200]}")
        if value is None:
            return None
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, (int, float, Fraction)):
            return float(value)  # outside [0, 1] it fails the prefix (score_paths checks)
        return BackendError(f"verifier {self.name} returned {type(value).__name__}, not bool, float or None")


# -- Game of 24 ------------------------------------------------------------------------------------

_FOUR_NUMBERS = re.compile(r"(?<![\d.])(\d+)(?:\s*,\s*|\s+)(\d+)(?:\s*,\s*|\s+)(\d+)(?:\s*,\s*|\s+)(\d+)(?![\d.])")
_SYMBOLS = {"×": "*", "∗": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "\\times": "*", "\\cdot": "*",
            "\\div": "/", "\\left(": "(", "\\right)": ")", "[": "(", "]": ")", "{": "(", "}": ")"}
_CANDIDATE = re.compile(r"[\d\s+\-*/().]+")
_MAX_EXPRESSION_CHARS = 200


def game24_numbers(question: str) -> list[int] | None:
    """The puzzle's four numbers: the first four whole numbers in a row in ``question`` (as the
    data set writes them, "1 1 4 6", or "1, 1, 4, 6"); None if there are none."""
    match = _FOUR_NUMBERS.search(question)
    return [int(g) for g in match.groups()] if match else None


def evaluate_arithmetic(expression: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of ``expression`` and the numbers it uses, in order, where it is whole
    numbers joined by + - * / and brackets only (parsed with ``ast``, never evaluated as code);
    None where it is anything else or divides by zero."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    numbers: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ZeroDivisionError
                return left / right
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return value(tree.body), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def check_game24(numbers: Sequence[int], text: str) -> bool | None:
    """Whether ``text`` holds an arithmetic expression that uses exactly ``numbers``, each once,
    and equals 24 exactly (in fractions: 8 / (3 - 8 / 3) is 24). True where one does. False where
    it holds only attempts: expressions of as many numbers or more that use other numbers or miss
    24. None where it holds no expression of that many numbers (an intermediate step such as
    "4 + 8 = 12": nothing to check yet). Expressions are read from the end of the text, around
    any "=", with ×, ÷ and LaTeX's \\times and \\div read as * and /."""
    for old, new in _SYMBOLS.items():
        text = text.replace(old, new)
    want = sorted(numbers)
    found_wrong = False
    for line in reversed(text.splitlines()):
        for part in line.split("="):
            for chunk in _CANDIDATE.findall(part):
                candidate = chunk.strip().lstrip("*/+").rstrip("*/+-").strip()
                if not any(c.isdigit() for c in candidate):
                    continue
                got = evaluate_arithmetic(candidate)
                if got is None or len(got[1]) < len(want):
                    continue
                if sorted(got[1]) == want and got[0] == 24:
                    return True
                found_wrong = True
    return False if found_wrong else None


def game24_verifier(question: str, steps: Sequence[str]) -> bool | None:
    """A Game of 24 verifier for ``CallableVerifier``: the puzzle's four numbers are read from the
    question (``game24_numbers``), the expression from the last step (``check_game24``). True for
    a right solution, False for a wrong attempt at one (an expression of four numbers or more that
    misses 24 or uses other numbers), None for a step with no such expression (an intermediate
    step) or a question without four numbers."""
    numbers = game24_numbers(question)
    if numbers is None or not steps:
        return None
    return check_game24(numbers, steps[-1])
