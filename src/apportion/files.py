"""Reading users' files line by line without losing a line, and writing outputs without losing a file.

Every command that reads JSONL or writes results goes through here, so that a bad byte names its
line instead of raising a traceback, an output never overwrites the input it was made from, and
an output is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from apportion.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line of a JSONL file: its 1-based number, and its value or what is wrong."""

    number: int
    value: Any = None
    error: str | None = None


def jsonl_lines(path: str | Path) -> Iterator[Line]:
    """Every non-blank line of ``path``, parsed; a line that is not UTF-8 or not JSON carries an
    error naming it instead. Raises ConfigError when the file cannot be read at all."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a JSONL file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a UTF-8 byte-order mark (Windows editors write one) is not content
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Line(number, error=f"line {number}: not valid UTF-8 (byte {exc.start + 1})")
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Line(number, error=f"line {number}: not valid JSON ({exc.msg})")
            continue
        except RecursionError:
            yield Line(number, error=f"line {number}: JSON nested too deeply")
            continue
        if not is_text(value):
            yield Line(number, error=f"line {number}: holds an unpaired \\u surrogate escape, which is not text")
            continue
        yield Line(number, value)


def is_text(value: Any) -> bool:
    """Whether every string in ``value`` can be written as UTF-8 (JSON's \\ud800 escapes and
    undecodable command-line bytes give Python strings that cannot)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_output(out: str | Path, *, inputs: tuple[str | Path | None, ...] = (), what: str = "--out") -> Path:
    """Refuse, before any work, an output file that cannot be written or would destroy an input."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{what} {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise ConfigError(f"{what} {out}: directory {out.parent} does not exist")
    for source in inputs:
        if source is not None and _same_file(out, Path(source)):
            raise ConfigError(f"{what} {out} is the input file {source}: it would be overwritten; "
                              "write the answers elsewhere")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"{what} {out} is not writable")
    partial = ReplacingWriter.partial_of(out)
    if partial.exists():
        raise ConfigError(f"{partial} exists (the rows of an interrupted run, or an input): move or delete it "
                          f"first, {what} is written through it")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


class ReplacingWriter:
    """Writes ``path`` through ``<path>.partial``, renamed over ``path`` when closed without an
    error: an existing file is replaced only by a complete new one, and a run cut off keeps what
    it wrote in the ``.partial`` file. ``replaced`` says what was there before (lines), if anything.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.partial = self.partial_of(self.path)
        self.replaced: int | None = _count_lines(self.path) if self.path.is_file() else None
        self._handle: IO[str] | None = None

    @staticmethod
    def partial_of(path: Path) -> Path:
        return path.with_name(path.name + ".partial")

    def __enter__(self) -> ReplacingWriter:
        try:
            self._handle = self.partial.open("w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot write {self.partial}: {exc.strerror or exc}") from None
        return self

    def write_line(self, row: dict[str, Any]) -> None:
        assert self._handle is not None, "use ReplacingWriter as a context manager"
        line = json.dumps(row, ensure_ascii=False)
        if not is_text(row):  # never lose a row to an unwritable character: escape it instead
            line = json.dumps(row)
        self._handle.write(line + "\n")
        self._handle.flush()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._handle is not None
        self._handle.close()
        if kind is None:
            self.partial.replace(self.path)


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0
