"""Answering many prompts concurrently, each with its own budget; one failure never sinks the rest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.algorithms.base import Algorithm
from apportion.budget.units import Budget
from apportion.errors import ApportionError, ConfigError, RunFailed
from apportion.files import Line, jsonl_lines
from apportion.lm.base import Backend
from apportion.result import Result

PROMPT_FIELDS = ("question", "prompt", "problem", "input")


@dataclass(frozen=True, slots=True)
class Item:
    """One line of an input file: its 1-based line number, id, and prompt, or why it is unusable."""

    line: int
    id: Any
    prompt: str | None
    error: str | None = None
    record: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    item: Item
    result: Result | None
    error: str | None
    allocation: dict[str, Any] | None = None
    """Under a total budget: what the allocator decided for this prompt (rounds, difficulty, bin)."""

    @property
    def status(self) -> str:
        """answered (an answer, possibly partial), unanswered (ran, no answer extracted), nothing
        drawn (the budget allowed no sample), failed (an error; its spend is in ``result``), or
        invalid (a line that could not be read)."""
        if self.item.error is not None:
            return "invalid"
        if self.result is None and self.error is None:  # a batch allocator gave it nothing
            return "nothing drawn"
        if self.result is None or (self.error is not None and not self.result.candidates):
            return "failed"
        if self.result.answer is not None:
            return "answered"
        return "unanswered" if self.result.candidates else "nothing drawn"

    def to_dict(self, *, trace: bool = False) -> dict[str, Any]:
        """A row that stands alone: the line, id and question it answers, the result, the error."""
        out: dict[str, Any] = {"line": self.item.line, "id": self.item.id, "question": self.item.prompt,
                               "status": self.status}
        if self.result is not None:
            out.update(self.result.to_dict(trace=trace))
        if self.error is not None:
            out["error"] = self.error
        if self.allocation is not None:
            out["allocation"] = self.allocation
        return out


def read_items(path: str | Path, field: str | None = None, id_field: str = "id") -> list[Item]:
    """Items of a JSONL file. A line that is not UTF-8, not JSON, or lacks the prompt field becomes
    an Item with an error (reported in the output), never a silent skip. Blank lines are ignored."""
    items = [_item(line, field, id_field) for line in jsonl_lines(path)]
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def _item(line: Line, field: str | None, id_field: str) -> Item:
    number, record = line.number, line.value
    if line.error is not None:
        return Item(number, number, None, line.error)
    if isinstance(record, str):
        return Item(number, number, record) if record.strip() else Item(
            number, number, None, f"line {number}: empty prompt")
    if not isinstance(record, dict):
        return Item(number, number, None, f"line {number}: expected a JSON object or string, got "
                                          f"{type(record).__name__}")
    ident = record.get(id_field, number)
    names = (field,) if field else PROMPT_FIELDS
    key = next((k for k in names if k in record), None)
    if key is None:
        return Item(number, ident, None, f"line {number}: no prompt field (looked for {', '.join(names)})", record)
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        return Item(number, ident, None, f"line {number}: field {key!r} is not a non-empty string", record)
    return Item(number, ident, value, None, record)


async def answer_many(
    algorithm_for: Callable[[], Algorithm],
    backend: Backend,
    items: Iterable[Item],
    budget: Budget,
    *,
    concurrency: int = 4,
    seed: int | None = None,
) -> AsyncIterator[Outcome]:
    """Outcomes in completion order. Each item gets its own copy of ``budget`` and its own seed
    (``seed + line``), so a file's answers do not depend on how the work was scheduled."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    limit = asyncio.Semaphore(concurrency)

    async def one(item: Item) -> Outcome:
        if item.error is not None or item.prompt is None:
            return Outcome(item, None, item.error or "no prompt")
        async with limit:
            try:
                result = await algorithm_for().run(
                    backend, item.prompt, budget, seed=None if seed is None else seed + item.line)
            except RunFailed as exc:  # nothing drawn, but the attempts' spend is in the result
                return Outcome(item, exc.result, f"line {item.line}: {exc}")
            except ApportionError as exc:
                return Outcome(item, None, f"line {item.line}: {exc}")
            except Exception as exc:
                return Outcome(item, None, f"line {item.line}: {type(exc).__name__}: {exc}")
        return Outcome(item, result, None if result.error is None else f"line {item.line}: {result.error}")

    # Tasks are handed over as they finish, and forgotten once their outcome is yielded: a long
    # batch does not keep every result it has already given away (nor make the garbage collector
    # walk them all again and again).
    finished: asyncio.Queue[asyncio.Task[Outcome]] = asyncio.Queue()
    pending: set[asyncio.Task[Outcome]] = set()
    for item in items:
        task = asyncio.ensure_future(one(item))
        task.add_done_callback(finished.put_nowait)
        pending.add(task)
    try:
        for _ in range(len(pending)):
            task = await finished.get()
            pending.discard(task)
            yield task.result()
    finally:
        for task in pending:
            task.cancel()
