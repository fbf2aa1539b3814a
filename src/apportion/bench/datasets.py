"""Evaluation datasets: the named benchmark files of the shared data folder, or any JSONL file.

Every item becomes a `Problem`: an id, the question, the gold answer as text (graded with the
project's own equivalence), and a difficulty level where the dataset has one.

Game of 24 (``game24``, the shared ``game24.csv``) has no gold answer: a puzzle's problem holds
its four numbers where the gold answer would be, and it is judged by the verifier
(``judge_for``: ``bench.judging.Game24Judge``). Its id is the puzzle's rank (1 easiest by human
solve time; the Tree-of-Thoughts paper uses ranks 901-1000, ``--offset 900``). Unless a system
prompt is chosen, its questions are asked with ``GAME24_SYSTEM_PROMPT`` (``system_prompt_for``),
which asks for steps and for the final expression after "The answer is".
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.answers.normalize import format_number, numeric_value
from apportion.banks import Problem
from apportion.errors import ConfigError
from apportion.files import jsonl_lines

DATA_ENV = "APPORTION_DATA_DIR"

GAME24 = "game24"
GAME24_FILE = "game24.csv"
GAME24_QUESTION = "Use the numbers {numbers}, each exactly once, with + - * / and brackets to make 24."
"""The puzzle as asked: its four numbers come first, as the ``game24`` verifier reads them."""
GAME24_SYSTEM_PROMPT = ("Solve the puzzle in short steps, separated by a blank line; each step combines two of the "
                        "numbers left. End with 'The answer is' and one expression that uses all four numbers, "
                        "e.g. 'The answer is (8 - 4) * (7 - 1)'.")
"""Asks for the final expression after "The answer is" (the default system prompt's "The answer
is N" invites a bare 24) and, like ``steps.STEP_SYSTEM_PROMPT``, for steps separated by blank lines."""


def _gsm8k_answer(raw: dict[str, Any]) -> str:
    return str(raw["answer"]).rsplit("####", 1)[-1].strip().replace(",", "")


def _number_text(value: Any) -> str:
    """MAWPS stores 14.0 for 14; the gold answer is written as a person would write it."""
    text = str(value).strip()
    parsed = numeric_value(text)
    return format_number(parsed) if parsed is not None else text


@dataclass(frozen=True, slots=True)
class _Spec:
    file: str
    question: str
    answer: Callable[[dict[str, Any]], str]
    level: str | None = None
    id: str | None = None


_SPECS: dict[str, _Spec] = {
    "gsm8k": _Spec("gsm8k_test.jsonl", "question", _gsm8k_answer),
    "math500": _Spec("math500_test.jsonl", "problem", lambda r: str(r["answer"]), "level", "unique_id"),
    "aime24": _Spec("aime24_test.jsonl", "problem", lambda r: _number_text(r["answer"]), id="id"),
    "amc23": _Spec("amc23_test.jsonl", "question", lambda r: _number_text(r["answer"]), id="id"),
    "mawps_singleop": _Spec("mawps_singleop.jsonl", "input", lambda r: _number_text(r["target"])),
    "mawps_addsub": _Spec("mawps_addsub.jsonl", "input", lambda r: _number_text(r["target"])),
}
_ALIASES = {"math-500": "math500", "math_500": "math500", "gsm8k_test": "gsm8k", "singleop": "mawps_singleop",
            "addsub": "mawps_addsub"}
DATASETS = (*_SPECS, GAME24)


def data_dir(explicit: str | Path | None = None) -> Path:
    """Where the named datasets live: ``explicit``, else $APPORTION_DATA_DIR, else ``shared/data``
    beside the working directory or beside the project checkout."""
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get(DATA_ENV):
        candidates.append(Path(os.environ[DATA_ENV]))
    here = Path(__file__).resolve()
    candidates += [Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data",
                   *(parent.parent / "shared" / "data" for parent in here.parents)]
    for candidate in candidates:
        if (candidate / _SPECS["gsm8k"].file).is_file() or (explicit and candidate.is_dir()):
            return candidate
    raise ConfigError(f"cannot find the shared data folder; pass --data-dir or set {DATA_ENV}")


def dataset_key(name: str) -> str | None:
    """The named dataset ``name`` stands for (aliases resolved), or None for a file of one's own."""
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in DATASETS and not Path(name).is_file() else None


def judge_for(name: str) -> str:
    """How the dataset's answers are judged (``bench.judging``): "game24" for Game of 24, else "gold"."""
    return "game24" if dataset_key(name) == GAME24 else "gold"


def system_prompt_for(name: str) -> str | None:
    """The system prompt the dataset's questions need where none is chosen (None: the algorithm's default)."""
    return GAME24_SYSTEM_PROMPT if dataset_key(name) == GAME24 else None


def load_dataset(name: str, *, data: str | Path | None = None, limit: int | None = None,
                 question_field: str | None = None, answer_field: str | None = None,
                 level_field: str | None = None, offset: int = 0) -> list[Problem]:
    """Problems of a named dataset, or of a JSONL file (``name`` is then its path; give
    ``question_field`` and ``answer_field`` unless they are ``question`` and ``answer``): the
    first ``limit`` after skipping ``offset``."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if offset < 0:
        raise ConfigError(f"offset must be >= 0, got {offset}")
    key = dataset_key(name)
    if key == GAME24:
        if question_field or answer_field or level_field:
            raise ConfigError("game24 has fixed fields (its puzzles): drop --question-field, --answer-field and "
                              "--level-field")
        path = data_dir(data) / GAME24_FILE
        problems = _read_game24(path, limit, offset)
    elif key is not None:
        spec = _SPECS[key]
        path = data_dir(data) / spec.file
        problems = _read(path, spec, question_field, answer_field, level_field, limit, offset)
    else:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"unknown dataset {name!r}: not one of {', '.join(DATASETS)} and not a file")
        spec = _Spec(path.name, "question", lambda r: _number_text(r["answer"]), id="id")
        problems = _read(path, spec, question_field, answer_field, level_field, limit, offset)
    if not problems:
        raise ConfigError(f"{path} holds no problems" + (f" after the first {offset}" if offset else ""))
    return problems


def _read_game24(path: Path, limit: int | None, offset: int) -> list[Problem]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    problems: list[Problem] = []
    for number, row in enumerate(rows[offset:], start=offset + 2):  # line 1 is the header
        puzzle, rank = (row.get("Puzzles") or "").split(), (row.get("Rank") or "").strip()
        if len(puzzle) != 4 or not all(p.isdigit() for p in puzzle) or not rank:
            raise ConfigError(f"{path}:{number}: expected a rank and four whole numbers, got {row!r}")
        numbers = " ".join(puzzle)
        problems.append(Problem(rank, GAME24_QUESTION.format(numbers=numbers), numbers))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _read(path: Path, spec: _Spec, question_field: str | None, answer_field: str | None,
          level_field: str | None, limit: int | None, offset: int = 0) -> list[Problem]:
    qf = question_field or spec.question
    answer_of = (lambda r: _number_text(r[answer_field])) if answer_field else spec.answer
    lf = level_field or spec.level
    problems: list[Problem] = []
    skipped = 0
    for line in jsonl_lines(path):
        number, raw = line.number, line.value
        if line.error is not None:
            raise ConfigError(f"{path}: {line.error}")
        if skipped < offset:
            skipped += 1
            continue
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(raw).__name__}")
        try:
            question = raw[qf]
            answer = answer_of(raw)
        except KeyError as exc:
            raise ConfigError(f"{path}:{number}: no field {exc.args[0]!r} "
                              f"(fields: {', '.join(sorted(raw))})") from None
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{path}:{number}: field {qf!r} is not a non-empty string")
        ident = raw.get(spec.id) if spec.id else None
        level = raw.get(lf) if lf else None
        problems.append(Problem(str(ident if ident is not None else number), question, answer,
                                None if level is None else _level(level)))
        if limit is not None and len(problems) >= limit:
            break
    return problems


def _level(value: Any) -> str:
    text = str(value)
    match = re.fullmatch(r"(?i)level\s*(\d+)", text.strip())
    return match.group(1) if match else text
