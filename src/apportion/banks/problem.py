"""A question with its gold answer: what datasets yield and bank entries record."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    question: str
    answer: str
    level: str | None = None
