"""Pull the final answer out of a model's text.

Explicit markers win over guesses, and the last marker wins over earlier ones (models restate and
correct themselves): ``\\boxed{}``, then ``#### x``, then "the answer is x" / "Answer: x", then
the last number in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apportion.answers.normalize import normalize_answer

METHODS = ("boxed", "hashes", "answer_is", "answer_colon", "last_number")

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Searched in the reversed text: the last digit and the run of characters a number can be made of
# before it (digits, signs, point, comma, slash, whitespace). No match of _NUMBER_RE crosses any
# other character, so a left-to-right scan starts afresh after it: _NUMBER_RE finds the same last
# number in that run as in the whole text, without scanning all of it.
_LAST_RUN_REVERSED_RE = re.compile(r"\d[-+.,/\d\s]*")
# Markers only: the answer is the rest of the marker's line, cut at the end of its clause.
_HASHES_RE = re.compile(r"####\s*")
_ANSWER_IS = r"answer\s+(?:is|would\s+be|will\s+be|=)\s*:?\s*"
_ANSWER_COLON = r"answer\s*:\s*"
_ANSWER_IS_RE = re.compile(_ANSWER_IS, re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(_ANSWER_COLON, re.IGNORECASE)
# The same patterns, case-sensitive, for an ASCII text's lower() (``_match_ends``).
_LOWER_PATTERNS = {_ANSWER_IS_RE: re.compile(_ANSWER_IS), _ANSWER_COLON_RE: re.compile(_ANSWER_COLON)}
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A sentence ends at a period followed by space/end, not at a decimal point.
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|;|(?<!\\),\s+(?:so|which|and|because)\b")


@dataclass(frozen=True, slots=True)
class Extracted:
    text: str
    method: str


def extract_answer(text: str) -> Extracted | None:
    """The final answer in ``text`` and how it was found, or None when there is nothing to find."""
    found = _extract(text)
    return None if found is None else Extracted(*found)


def _extract(text: str) -> tuple[str, str] | None:
    """``extract_answer`` as (answer, method), without the object (one per sample read)."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    lowered = text.lower()
    # Substring tests skip the scans that cannot match (most texts have one marker or none). Under
    # IGNORECASE "s" also matches the long s (U+017F), which lower() keeps: its presence forces the scan.
    words = "answer" in lowered or "\u017f" in text
    for method, pattern, present in (("hashes", _HASHES_RE, "####" in text), ("answer_is", _ANSWER_IS_RE, words),
                                     ("answer_colon", _ANSWER_COLON_RE, words)):
        if not present:
            continue
        for end in _match_ends(pattern, text, lowered):
            value = _first_clause(text[end:].split("\n", 1)[0])
            if value and (len(value) <= 12 or _plausible(value)):  # 7 words take 13 characters
                return value, method
    run = _LAST_RUN_REVERSED_RE.search(text[::-1])
    if run is None:  # every number has a digit
        return None
    numbers = _NUMBER_RE.findall(text, len(text) - run.end())
    return numbers[-1].strip(), "last_number"


def _match_ends(pattern: re.Pattern[str], text: str, lowered: str) -> list[int]:
    """Where each match of ``pattern`` in ``text`` ends, the last match first."""
    lower = _LOWER_PATTERNS.get(pattern)
    if lower is None or not text.isascii():
        return [m.end() for m in reversed(list(pattern.finditer(text)))]
    # In ASCII text lower() keeps every index, and the answer markers match there case-sensitively.
    # Every match starts at an "answer", which neither overlaps itself nor occurs inside a match:
    # trying the pattern at each one, from the last, finds the same matches in reverse order.
    ends = []
    stop = len(lowered)
    while (at := lowered.rfind("answer", 0, stop)) >= 0:
        match = lower.match(lowered, at)
        if match:
            ends.append(match.end())
        stop = at
    return ends


_NONE = (None, None, None)


def read_answer(text: str) -> tuple[str | None, str | None, str | None]:
    """(normalised answer, answer as written, extraction method), all None when there is none:
    what every candidate, live or from a bank, records about its answer."""
    found = _extract(text)
    if found is None:
        return _NONE
    return normalize_answer(found[0]), found[0], found[1]


_PLACEHOLDER_RE = re.compile(r"answer is ([A-Za-z])\b")


def read_answer_for(text: str, placeholder: str | None) -> tuple[str | None, str | None, str | None]:
    """``read_answer``, except that an answer equal to the instruction's ``placeholder`` is none."""
    found = _extract(text)  # read_answer's body, inlined: this runs once per sample
    if found is None or (placeholder is not None and found[0].strip() == placeholder):
        return _NONE
    return normalize_answer(found[0]), found[0], found[1]


def placeholder_in(instruction: str | None) -> str | None:
    """The letter an instruction uses as the answer's placeholder ("End with 'The answer is N'"),
    which weak models copy verbatim: an answer equal to it is no answer."""
    found = _PLACEHOLDER_RE.search(instruction or "")
    return found.group(1) if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if absent or unclosed."""
    if "\\" not in text:  # every opening starts with a backslash
        return None
    starts = [m.end() for m in _BOX_OPEN_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _plausible(value: str) -> bool:
    """A short phrase ("Tuesday", "(B)") or anything with digits or LaTeX can be an answer; a long
    sentence without either ("the same as in the last step") is prose, not an answer."""
    return len(value.split()) <= 6 or any(ch.isdigit() or ch == "\\" for ch in value)


def _first_clause(value: str) -> str:
    value = value.strip().strip("*").strip()
    if not value:
        return ""
    if "\\" in value:  # every \boxed opening has one (last_boxed's own test, without the call)
        boxed = last_boxed(value)
        if boxed is not None:
            return boxed.strip()
    if value.startswith("$") and value.count("$") >= 2:
        return value[1 : value.index("$", 1)].strip()
    end = _SENTENCE_END_RE.search(value)
    if end:
        value = value[: end.start()]
    return value.strip().rstrip(".").strip("*").strip()
