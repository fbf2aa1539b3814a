"""Normalise extracted answers so that equal answers look equal before any symbolic check.

"$1,000.00", "1000 dollars" and "1000" all become "1000"; "\\frac{3}{4}" and "3/4" become "3/4";
"x = 5" becomes "5". Numbers get an exact canonical key (a Fraction), which lets voting group
numeric answers without calling a symbolic verifier at all.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

_WRAPPERS = (
    (re.compile(r"^\\\((.*)\\\)$", re.S), r"\1"),
    (re.compile(r"^\\\[(.*)\\\]$", re.S), r"\1"),
    (re.compile(r"^\$+(.*?)\$+$", re.S), r"\1"),
    (re.compile(r"^\*\*(.*)\*\*$", re.S), r"\1"),
)
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_FRAC_SHORT = re.compile(r"\\[dt]?frac(\d)(\d)")
_ASSIGN = re.compile(r"^[^=<>]+=\s*(?!=)([^=]+)$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_NUMBER_WITH_UNIT = re.compile(
    r"^([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*\d+)?)\s*(?:\\?%|[A-Za-z][A-Za-z .'\-]*)?$"
)
_CURRENCY = re.compile(r"^(?:\\\$|\$|USD\s*|US\$|€|£|rs\.?\s*)", re.IGNORECASE)
_SPACE_CMDS = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_SPACES = re.compile(r"\s+")
# Where each wrapper pattern must start (all are anchored at ^): a string starting otherwise has none.
_WRAPPER_STARTS = ("\\", "$", "*")
# Normalised answers repeat (a vote is many samples agreeing), so each distinct spelling is worked
# out once per process; the function is pure, so the cache cannot change an answer.
_CACHE_SIZE = 1 << 14


@lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(raw: str) -> str:
    """A cleaned, comparable form of an extracted answer (never empty for non-empty input)."""
    if raw.isascii() and raw.isdigit() and len(raw) <= _MAX_NUMBER_CHARS:  # the common case, as below
        return str(int(raw))
    s = raw.strip()
    for _ in range(3):  # wrappers nest: $\boxed{...}$, **$x$**
        before = s
        if s.startswith(_WRAPPER_STARTS):
            for pattern, repl in _WRAPPERS:
                s = pattern.sub(repl, s).strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    # Each rewrite below is skipped where the character every match needs is absent.
    if "\\" in s:
        s = _TEXT_CMD.sub(r" \1", s)
    if "\\" in s or "~" in s:
        s = _SPACE_CMDS.sub(" ", s)
    if "^" in s or "°" in s:
        s = _DEGREES.sub("", s)
    if "\\" in s:
        s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
        s = _FRAC.sub(r"\1/\2", s)
        s = _FRAC_SHORT.sub(r"\1/\2", s)
    if "=" in s:
        assign = _ASSIGN.match(s)
        if assign:
            s = assign.group(1).strip()
    s = _CURRENCY.sub("", s).strip()
    if "," in s:
        s = _THOUSANDS.sub("", s)
    numeric = _NUMBER_WITH_UNIT.match(s)
    if numeric:
        s = numeric.group(1)
    s = _SPACES.sub(" ", s).strip()
    value = numeric_value(s)
    if value is not None:
        return format_number(value)
    return s or raw.strip()


_MAX_NUMBER_CHARS = 40
# "1e5000" is six characters but a 5001-digit number (past Python's int-to-text limit, and
# 10**N costs time and memory as N grows): such a reply is kept as text, not as a number.
_MAX_EXPONENT = 100
_EXPONENT = re.compile(r"[eE]([+-]?\d+)")


def numeric_value(text: str) -> Fraction | None:
    """Exact value of a plain number or simple fraction ("-3", "2.50", "3/4", "-1/2"); else None."""
    t = text.replace(" ", "")
    if not t or len(t) > _MAX_NUMBER_CHARS:
        return None
    if t.isascii() and t.isdigit():  # a plain integer: what Fraction(t) would give, without its parser
        return Fraction(int(t))
    if "e" in t or "E" in t:
        exponent = _EXPONENT.search(t)
        if exponent and abs(int(exponent.group(1))) > _MAX_EXPONENT:
            return None
    try:
        if "/" in t:
            num, _, den = t.partition("/")
            if not den or "." in den:
                return None
            value = Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
            return value
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text of a number: integers bare, terminating decimals without trailing zeros,
    other rationals as p/q."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den == 1:
        text = f"{float(value):.15f}".rstrip("0").rstrip(".")
        if Fraction(text) == value:
            return text
    return f"{value.numerator}/{value.denominator}"
