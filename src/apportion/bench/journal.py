"""The live cells' journal: ``live.jsonl`` in a run directory, one flushed line per finished question.

Live cells take minutes per question on a small machine, so a cut-off run must keep what it
finished, as a bank does for sampling. The first line is a header with what the outcomes depend
on (dataset, model, seed, sampling, scorers, search settings, judge); every other line is one
question's outcome in one cell: the system ("apportion" or a peer), algorithm, budget, the
problem, right or not, the answer judged, tokens, dollars, error, a search's figures, the
question's wall time and its full result. ``--resume`` reads the journal back: a header that
differs from the run's is refused (the outcomes would mix two configurations), a line cut off
mid-write is dropped, and the cells skip every (system, algorithm, budget, question) it holds.
Rows are made from the outcomes in dataset order, so a resumed cell's row is an uncut run's (its
wall time aside).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from apportion.banks import Problem
from apportion.bench.grid import QuestionOutcome
from apportion.errors import ConfigError

JOURNAL_FILE = "live.jsonl"
JOURNAL_VERSION = 1

Key = tuple[str, str, int]
"""(system, algorithm, budget): one cell."""


class LiveJournal:
    """``with LiveJournal(path, meta, problems, resume=...) as journal``: ``done(cell)`` holds the
    outcomes already journaled for a cell (by question id), ``add(cell, outcome)`` journals one."""

    def __init__(self, path: Path, meta: Mapping[str, Any], problems: list[Problem], *, resume: bool,
                 later_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """``later_defaults``: by header section, fields added after journals were first written.
        At their default they are left out of the header written and of the one read, so a
        journal that never knew them, or wrote them at their default, resumes alike."""
        self.path = path
        self._later = {k: dict(v) for k, v in (later_defaults or {}).items()}
        self._done: dict[Key, dict[str, QuestionOutcome]] = {}
        header = self._without_later_defaults({"journal": JOURNAL_VERSION, **_plain(dict(meta))})
        fresh = not (resume and path.is_file() and path.stat().st_size)
        if not fresh:
            self._read(header, {p.id: p for p in problems})
        self._out: TextIO = path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            self._write(header)

    def done(self, cell: Key) -> dict[str, QuestionOutcome]:
        return dict(self._done.get(cell, {}))

    def add(self, cell: Key, outcome: QuestionOutcome) -> None:
        system, algorithm, budget = cell
        p = outcome.problem
        self._write({"system": system, "algorithm": algorithm, "budget": budget,
                     "problem": {"id": p.id, "question": p.question, "answer": p.answer, "level": p.level},
                     "right": outcome.right, "input_tokens": outcome.input_tokens,
                     "output_tokens": outcome.output_tokens, "usd": outcome.usd, "answer": outcome.answer,
                     "error": outcome.error, "search": outcome.search, "seconds": outcome.seconds,
                     "extra": outcome.extra})
        self._done.setdefault(cell, {})[p.id] = outcome

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> LiveJournal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write(self, line: dict[str, Any]) -> None:
        self._out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._out.flush()  # each line is on disk when its question is done: a kill loses the running ones only

    def _without_later_defaults(self, header: dict[str, Any]) -> dict[str, Any]:
        out = dict(header)
        for section, defaults in self._later.items():
            if isinstance(out.get(section), dict):
                out[section] = {k: v for k, v in out[section].items() if k not in defaults or v != defaults[k]}
        return out

    def _read(self, header: dict[str, Any], problems: dict[str, Problem]) -> None:
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):  # killed mid-write: the partial line is dropped, appends start afresh
            data = data[: data.rfind(b"\n") + 1]
            self.path.write_bytes(data)
        lines = data.decode("utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            head = {}
        if not isinstance(head, dict) or head.get("journal") != JOURNAL_VERSION:
            raise ConfigError(f"cannot resume: {self.path} is not a live-cell journal")
        head = self._without_later_defaults(head)
        for key, value in header.items():
            if head.get(key) != value:
                raise ConfigError(f"cannot resume: the journal's cells ran with {key}={head.get(key)!r}, this run has "
                                  f"{value!r} (start a new --out)")
        for number, line in enumerate(lines[1:], start=2):
            try:
                raw = json.loads(line)
                problem = Problem(**raw["problem"])
                cell = (str(raw["system"]), str(raw["algorithm"]), int(raw["budget"]))
                outcome = QuestionOutcome(problem, float(raw["right"]), raw["input_tokens"], raw["output_tokens"],
                                          float(raw["usd"]), raw["answer"], raw["error"], raw["extra"], raw["search"],
                                          raw["seconds"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{self.path}:{number}: not a journal line ({exc})") from None
            mine = problems.get(problem.id)
            if mine is None:
                continue  # journaled by a run over more questions: kept, not used
            if mine != problem:
                raise ConfigError(f"cannot resume: question {problem.id} of the journal is not this dataset's "
                                  f"question {problem.id}")
            self._done.setdefault(cell, {})[problem.id] = outcome


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """As JSON gives it back (tuples become lists), so that a header compares with the one read."""
    plain: dict[str, Any] = json.loads(json.dumps(value))
    return plain
