"""Answering many prompts concurrently, each with its own budget; one failure never sinks the rest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.algorithms.base import Algorithm
from apportion.budget.units import Budget
from apportion.errors import ApportionError, ConfigError
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

    def to_dict(self, *, trace: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.item.line, "id": self.item.id}
        if self.result is not None:
            out.update(self.result.to_dict(trace=trace))
        else:
            out["error"] = self.error
        return out


def read_items(path: str | Path, field: str | None = None, id_field: str = "id") -> list[Item]:
    """Items of a JSONL file. A line that is not JSON, or lacks the prompt field, becomes an Item
    with an error (reported in the output), never a silent skip. Blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    items = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        items.append(_item(number, raw, field, id_field))
    if not items:
        raise ConfigError(f"{path} holds no prompts")
    return items


def _item(number: int, raw: str, field: str | None, id_field: str) -> Item:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Item(number, number, None, f"line {number}: not valid JSON ({exc.msg})")
    if isinstance(record, str):
        return Item(number, number, record) if record.strip() else Item(
            number, number, None, f"line {number}: empty prompt")
    if not isinstance(record, dict):
        return Item(number, number, None, f"line {number}: expected a JSON object or string")
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
            except ApportionError as exc:
                return Outcome(item, None, f"line {item.line}: {exc}")
            except Exception as exc:
                return Outcome(item, None, f"line {item.line}: {type(exc).__name__}: {exc}")
        return Outcome(item, result, None)

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()
