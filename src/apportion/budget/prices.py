"""Per-model prices (USD per million input / output tokens) for dollar budgets.

The built-in table holds public list prices as published by the vendors; they change, so a user
can override any entry (``--price``) or load a JSON file of their own. A model with no known price
cannot be held to a dollar budget: asking for one is an error, never a silent zero.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from apportion.budget.units import Price
from apportion.errors import BudgetError

# List prices, USD per 1M tokens (input, output), as published in 2025.
BUILTIN_PRICES: Mapping[str, Price] = {
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
}


class PriceTable:
    """Looks up a model's price: exact name first, then the longest known prefix
    (``gpt-4o-mini-2024-07-18`` is priced as ``gpt-4o-mini``)."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self._prices = dict(BUILTIN_PRICES if prices is None else prices)

    def with_price(self, model: str, price: Price) -> PriceTable:
        return PriceTable({**self._prices, model: price})

    def lookup(self, model: str) -> Price | None:
        if model in self._prices:
            return self._prices[model]
        matches = [name for name in self._prices if model.startswith(name)]
        return self._prices[max(matches, key=len)] if matches else None

    @classmethod
    def from_json(cls, path: str | Path, base: PriceTable | None = None) -> PriceTable:
        """``{"model": {"input": 0.15, "output": 0.6}, ...}`` or ``{"model": [0.15, 0.6]}``."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BudgetError(f"cannot read price file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise BudgetError(f"price file {path} must hold a JSON object of model -> price")
        table = dict((base or cls())._prices)
        for model, value in raw.items():
            if isinstance(value, dict) and {"input", "output"} <= value.keys():
                table[model] = Price(value["input"], value["output"])
            elif isinstance(value, list) and len(value) == 2:
                table[model] = Price(value[0], value[1])
            else:
                raise BudgetError(
                    f"price file {path}: entry {model!r} must be {{'input': X, 'output': Y}} or [X, Y]"
                )
        return cls(table)
