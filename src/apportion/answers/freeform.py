"""Free-form answers: self-consistency and best-of-N over chat replies, not math.

The math path reads a final answer out of a reply (a box, "the answer is", the last number). For
"Name a good name for a cat" or "Summarise this paragraph" the last number in the prose means
nothing, so an answer mode says how a reply becomes the thing the vote counts:

- ``"math"`` (the default): ``answers/extract.py`` and ``answers/equivalence.py``, as always.
- ``"text"``: the answer is the whole reply, normalised (``normalize_text``); two answers are the
  same when those are equal. Nothing is ever extracted, numbers included.
- ``"judge"``: as ``"text"``, and then the model itself is asked whether two replies say the same
  thing. Each new answer is compared with the representative of every class so far, all those
  comparisons in one concurrent round, one judge call per pair never asked before; it joins the
  first class (in order of appearance) the judge says yes to, or starts its own. Judge calls go
  through the run's metered backend and are charged to its budget as scoring. When the budget
  refuses one (or a call fails), the rest of the run compares answers by normalised text and a
  note says so: a run never fails for want of a judge.

Under ``"judge"`` a candidate's ``answer`` is its class representative's normalised text, so that
the vote, the stop rules and the distribution (all of which cluster by ``TextEquivalence``, by
equality) see exactly the judge's classes; ``raw_answer`` keeps the candidate's own reply.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, cast, get_args

from apportion.answers.equivalence import Equivalence
from apportion.errors import BackendError, BudgetExhausted, ConfigError
from apportion.lm.base import Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate
from apportion.reward.judge import parse_verdict

AnswerMode = Literal["math", "text", "judge"]
ANSWER_MODES: tuple[AnswerMode, ...] = get_args(AnswerMode)

# What takes each mode. Other algorithms read their answers their own way (a step-wise search ends
# a path at an answer marker, budget forcing cuts thinking at one, a program prints a number), so
# a free-form mode would not reach them: they refuse it instead of quietly reading a number.
# Judge mode needs the candidates to pass through ``sample_batches``, where the judge is awaited.
_MODES_OF: Mapping[str, tuple[AnswerMode, ...]] = {
    "self-consistency": ("math", "text", "judge"),
    "best-of-n": ("math", "text", "judge"),
    "weighted-best-of-n": ("math", "text", "judge"),
    "debate": ("math", "text"),
    # each approach would judge its own classes, which the pooled vote could not join: text only
    "planning": ("math", "text"),
}

_SPACES = re.compile(r"\s+")
# Quotes, emphasis and sentence punctuation around a reply are not its content ("Paris." is "paris").
_EDGES = "\"'`*_.,;:!?\u201c\u201d\u2018\u2019\u201e\u00ab\u00bb\u300c\u300d "
# Run on casefolded text: "The answer is", "Final answer:", "Answer -".
_LEAD = re.compile(r"(?:the\s+)?(?:final\s+)?answer(?:\s+is\b|\s*[:\-])\s*")


def parse_answer_mode(text: str) -> AnswerMode:
    """``text`` as an answer mode (``--answers``), or a ConfigError that lists the modes."""
    mode = text.strip().lower()
    if mode not in ANSWER_MODES:
        raise ConfigError(f"unknown answer mode {text!r}; known: {', '.join(ANSWER_MODES)}")
    return cast(AnswerMode, mode)


def normalize_text(text: str) -> str | None:
    """A reply's comparable form: Unicode NFKC, casefolded, white space collapsed, surrounding quotes
    and punctuation and a leading "Answer:" / "The answer is" stripped; None when nothing is left."""
    s = _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    while True:
        before = s
        s = s.strip(_EDGES)
        lead = _LEAD.match(s)
        if lead:
            s = s[lead.end():]
        if s == before:
            return s or None


class TextEquivalence(Equivalence):
    """Equality of free-form answers (already normalised by ``normalize_text``): no numbers read,
    no symbolic check. "3 apples" and "3" differ here, as two replies that merely share a number must."""

    def __init__(self) -> None:
        super().__init__(use_math_verify=False)

    def key(self, answer: str) -> str:
        return answer

    def same(self, a: str, b: str) -> bool:
        return a == b

    def cluster(self, answers: Sequence[str | None]) -> list[int | None]:
        index: dict[str, int] = {}
        return [None if a is None else index.setdefault(a, len(index)) for a in answers]


def answer_mode(algorithm: object) -> AnswerMode:
    """The mode an algorithm was built with: its sampling options' (a planning run: its base's)."""
    sampling = getattr(getattr(algorithm, "options", None), "sampling", None)
    mode = getattr(sampling, "answers", None)
    if mode is None:
        base = getattr(algorithm, "base", None)
        return answer_mode(base) if base is not None else "math"
    return cast(AnswerMode, mode)


def check_answer_mode(algorithm: object) -> AnswerMode:
    """``answer_mode(algorithm)``, or a ConfigError where the algorithm (or a planning run's base)
    cannot compare answers that way."""
    mode = answer_mode(algorithm)
    if mode == "math":
        return mode
    for each in (algorithm, getattr(algorithm, "base", None)):
        name = getattr(each, "name", None)
        if each is not None and mode not in _MODES_OF.get(str(name), ("math",)):
            takers = ", ".join(n for n, modes in _MODES_OF.items() if mode in modes)
            raise ConfigError(f"answers={mode!r} (free-form answers) works with {takers}; {name} reads its "
                              "answers its own way (answer markers, numbers): use answers='math' with it")
    return mode


DEFAULT_SAME_SYSTEM = "You compare two responses to the same request and say whether they agree."
DEFAULT_SAME_TEMPLATE = (
    "Request:\n{question}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Do responses A and B give the same answer, in substance, whatever their wording? "
    "Reply with one word: Yes or No."
)


@dataclass(frozen=True, slots=True)
class JudgeClusterOptions:
    """How judge mode asks whether two replies say the same thing."""

    max_tokens: int = 8
    """A verdict is one word; a little room for "**Yes**." and the like."""
    system_prompt: str | None = DEFAULT_SAME_SYSTEM
    template: str = DEFAULT_SAME_TEMPLATE
    """Fields: ``{question}``, ``{a}`` (the class representative's reply), ``{b}`` (the new reply)."""
    max_response_chars: int = 4000
    """A longer reply is shown by its head and tail (a summary's opening and its conclusion)."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_response_chars < 2:
            raise ConfigError("judge clustering's max_tokens must be >= 1 and max_response_chars >= 2")
        if "{a}" not in self.template or "{b}" not in self.template:
            raise ConfigError("the same-answer judge template must contain {a} and {b}")


class FreeFormAnswers:
    """One run's free-form answers: reads each sample's answer, and in judge mode clusters them.

    ``lm`` is the run's metered backend (judge calls go through its ``scorer()``), ``notes`` the
    run's notes, which this appends to."""

    def __init__(self, mode: AnswerMode, lm: MeteredLM, question: str, notes: list[str],
                 options: JudgeClusterOptions | None = None) -> None:
        if mode == "math":
            raise ConfigError("free-form answers are the 'text' and 'judge' modes; 'math' reads answers as always")
        self.mode = mode
        self.options = options or JudgeClusterOptions()
        self.judge_calls = 0
        """Judge calls made (one per pair of replies compared)."""
        self._judge = lm.scorer()
        self._question = question
        self._notes = notes
        self._reps: list[str] = []
        """Class representatives' normalised texts, in order of appearance."""
        self._rep_text: dict[str, str] = {}
        """Each representative's reply as written: what the judge is shown."""
        self._class: dict[str, tuple[str, str]] = {}
        """Every normalised text seen: the representative of its class, and how it was put there
        ("judge", or "text" once the judge is out of the run)."""
        self._verdicts: dict[tuple[str, str], bool] = {}
        self._fallback = False

    @property
    def judged(self) -> bool:
        """Whether answers are clustered by the judge (and not, or no longer, by text alone)."""
        return self.mode == "judge" and not self._fallback

    def candidates(self, samples: Sequence[Sample], model: str | None) -> list[Candidate]:
        """A candidate per sample, its answer the whole reply normalised (a sample cut mid-thought has none)."""
        make = Candidate.from_sample
        out = []
        for s in samples:
            key = None if s.finish_reason == "cut" else normalize_text(s.text)
            out.append(make(s, None, None, None, model) if key is None else make(s, key, s.text.strip(), "text", model))
        return out

    async def cluster(self, batch: Sequence[Candidate], seen: Sequence[Candidate] = ()) -> list[Candidate]:
        """``batch`` with each answer replaced by its class representative's, the judge asked where
        needed. ``seen`` are the candidates already voted (a resumed run's earlier ones among them):
        their answers stand as classes of their own, with no judge call."""
        for c in seen:
            if c.answer is not None and c.answer not in self._class:
                self._add_class(c.answer, c.text, "judge" if self.judged else "text")
        out = []
        for c in batch:
            if c.answer is None:
                out.append(c)
                continue
            known = self._class.get(c.answer)
            rep, method = known if known is not None else await self._classify(c.answer, c.text)
            out.append(c if (rep, method) == (c.answer, c.extraction) else replace(c, answer=rep, extraction=method))
        return out

    async def _classify(self, key: str, text: str) -> tuple[str, str]:
        """The representative of the class ``key`` joins: the first the judge says yes to, or its own."""
        if self.judged and self._reps:
            pairs = [(rep, key) for rep in self._reps if _pair(rep, key) not in self._verdicts]
            outcomes = await asyncio.gather(*(self._same(self._rep_text[rep], text) for rep, _ in pairs),
                                            return_exceptions=True)  # each call settles before any failure counts
            failed: BaseException | None = None
            for (rep, _), outcome in zip(pairs, outcomes):
                if isinstance(outcome, bool):
                    self._verdicts[_pair(rep, key)] = outcome
                elif isinstance(outcome, (BudgetExhausted, BackendError)):
                    failed = failed or outcome
                else:  # a bug, or cancellation: not the judge's verdict
                    raise outcome
            if failed is not None:
                self._fall_back(failed)
            joined = next((rep for rep in self._reps if self._verdicts.get(_pair(rep, key))), None)
            if joined is not None:
                self._class[key] = (joined, "judge")
                return self._class[key]
        self._add_class(key, text, "judge" if self.judged else "text")
        return self._class[key]

    async def _same(self, a: str, b: str) -> bool:
        o = self.options
        content = o.template.format(question=self._question, a=_clip(a, o.max_response_chars),
                                    b=_clip(b, o.max_response_chars))
        params = SamplingParams(max_tokens=o.max_tokens, temperature=0.0)
        completion = await self._judge.generate(Prompt.chat(content, system=o.system_prompt), params)
        self.judge_calls += 1
        verdict = parse_verdict(completion.samples[0].text) if completion.samples else None
        if verdict is None:
            note = "some same-answer judge replies began with neither yes nor no: read as different answers"
            if note not in self._notes:
                self._notes.append(note)
        return bool(verdict)

    def _add_class(self, key: str, text: str, method: str) -> None:
        self._reps.append(key)
        self._rep_text[key] = text
        self._class[key] = (key, method)

    def _fall_back(self, why: BaseException) -> None:
        if self._fallback:
            return
        self._fallback = True
        refused = isinstance(why, BudgetExhausted)
        cause = "the budget refused a same-answer judge call" if refused else f"a same-answer judge call failed ({why})"
        self._notes.append(f"{cause} after {self.judge_calls} calls: the remaining answers were compared "
                           "by normalised text")


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[...]\n{text[-half:]}"
