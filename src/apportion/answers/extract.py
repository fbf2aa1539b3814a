"""Pull the final answer out of a model's text.

Explicit markers win over guesses, and the last marker wins over earlier ones (models restate and
correct themselves): ``\\boxed{}``, then ``#### x``, then "the answer is x" / "Answer: x", then
the last number in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

METHODS = ("boxed", "hashes", "answer_is", "answer_colon", "last_number")

_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# Markers only: the answer is the rest of the marker's line, cut at the end of its clause.
_HASHES_RE = re.compile(r"####\s*")
_ANSWER_IS_RE = re.compile(r"answer\s+(?:is|would\s+be|will\s+be|=)\s*:?\s*", re.IGNORECASE)
_ANSWER_COLON_RE = re.compile(r"answer\s*:\s*", re.IGNORECASE)
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A sentence ends at a period followed by space/end, not at a decimal point.
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)|;|(?<!\\),\s+(?:so|which|and|because)\b")


@dataclass(frozen=True, slots=True)
class Extracted:
    text: str
    method: str


def extract_answer(text: str) -> Extracted | None:
    """The final answer in ``text`` and how it was found, or None when there is nothing to find."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return Extracted(boxed.strip(), "boxed")
    for method, pattern in (("hashes", _HASHES_RE), ("answer_is", _ANSWER_IS_RE),
                            ("answer_colon", _ANSWER_COLON_RE)):
        for match in reversed(list(pattern.finditer(text))):
            value = _first_clause(text[match.end():].split("\n", 1)[0])
            if value and _plausible(value):
                return Extracted(value, method)
    numbers = _NUMBER_RE.findall(text)
    if numbers:
        return Extracted(numbers[-1].strip(), "last_number")
    return None


def read_answer(text: str) -> tuple[str | None, str | None, str | None]:
    """(normalised answer, answer as written, extraction method), all None when there is none:
    what every candidate, live or from a bank, records about its answer."""
    from apportion.answers.normalize import normalize_answer

    found = extract_answer(text)
    if found is None:
        return None, None, None
    return normalize_answer(found.text), found.text, found.method


_PLACEHOLDER_RE = re.compile(r"answer is ([A-Za-z])\b")


def read_answer_for(text: str, placeholder: str | None) -> tuple[str | None, str | None, str | None]:
    """``read_answer``, except that an answer equal to the instruction's ``placeholder`` is none."""
    answer, raw, method = read_answer(text)
    if raw is not None and placeholder is not None and raw.strip() == placeholder:
        return None, None, None
    return answer, raw, method


def placeholder_in(instruction: str | None) -> str | None:
    """The letter an instruction uses as the answer's placeholder ("End with 'The answer is N'"),
    which weak models copy verbatim: an answer equal to it is no answer."""
    found = _PLACEHOLDER_RE.search(instruction or "")
    return found.group(1) if found else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces; None if absent or unclosed."""
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
    boxed = last_boxed(value)
    if boxed is not None:
        return boxed.strip()
    if value.startswith("$") and value.count("$") >= 2:
        return value[1 : value.index("$", 1)].strip()
    end = _SENTENCE_END_RE.search(value)
    if end:
        value = value[: end.start()]
    return value.strip().rstrip(".").strip("*").strip()
