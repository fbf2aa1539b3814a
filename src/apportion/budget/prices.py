"""Per-model prices (USD per million input / cached input / output tokens) for dollar budgets.

The built-in table holds public list prices as published by the vendors; they change, so a user
can override any entry (``--price``) or load a JSON file of their own. A model with no known price
cannot be held to a dollar budget: asking for one is an error, never a silent zero. The cached
input price is what a prompt token the server served from its prefix cache costs (OpenAI's
"cached input", Anthropic's cache reads); where a price has none, cached tokens cost the input
price.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apportion.budget.units import Price
from apportion.errors import BudgetError

# List prices, USD per 1M tokens (input, output, cached input), as published in 2025.
BUILTIN_PRICES: Mapping[str, Price] = {
    "gpt-4o": Price(2.50, 10.00, cached_input_per_mtok=1.25),
    "gpt-4o-mini": Price(0.15, 0.60, cached_input_per_mtok=0.075),
    "gpt-4.1": Price(2.00, 8.00, cached_input_per_mtok=0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, cached_input_per_mtok=0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, cached_input_per_mtok=0.025),
    "o3-mini": Price(1.10, 4.40, cached_input_per_mtok=0.55),
    "o4-mini": Price(1.10, 4.40, cached_input_per_mtok=0.275),
    "claude-3-5-haiku": Price(0.80, 4.00, cached_input_per_mtok=0.08),
    "claude-3-7-sonnet": Price(3.00, 15.00, cached_input_per_mtok=0.30),
}


def price_from_json(value: Any) -> Price | None:
    """``[IN, OUT]``, ``[IN, CACHED, OUT]`` (the order vendors list them) or ``{"input": IN,
    "output": OUT}`` with an optional ``"cached"``; None for anything else."""
    if isinstance(value, list) and len(value) == 2:
        return Price(value[0], value[1])
    if isinstance(value, list) and len(value) == 3:
        return Price(value[0], value[2], value[1])
    if isinstance(value, dict) and {"input", "output"} <= value.keys():
        return Price(value["input"], value["output"], value.get("cached"))
    return None


def price_to_json(price: Price) -> list[float]:
    """The list ``price_from_json`` reads back: ``[IN, OUT]``, or ``[IN, CACHED, OUT]``."""
    if price.cached_input_per_mtok is None:
        return [price.input_per_mtok, price.output_per_mtok]
    return [price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok]


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
        """``{"model": {"input": 0.15, "output": 0.6}, ...}`` or ``{"model": [0.15, 0.6]}``; a
        cached input price as ``{"input": 0.15, "cached": 0.075, "output": 0.6}`` or
        ``[0.15, 0.075, 0.6]`` (input, cached input, output)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BudgetError(f"cannot read price file {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise BudgetError(f"price file {path} must hold a JSON object of model -> price")
        table = dict((base or cls())._prices)
        for model, value in raw.items():
            try:
                price = price_from_json(value)
            except BudgetError as exc:
                raise BudgetError(f"price file {path}: entry {model!r}: {exc}") from None
            if price is None:
                raise BudgetError(
                    f"price file {path}: entry {model!r} must be {{'input': X, 'output': Y}} (with an optional "
                    "'cached': Z), [X, Y] or [X, Z, Y]"
                )
            table[model] = price
        return cls(table)
