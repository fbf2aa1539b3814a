"""Several models: a models file, each model's price, and what k samples of each cost.

A models file is a JSON list, cheapest first where it is used as a cascade::

    [{"name": "smollm2", "price": "0.01,0.02"},
     {"name": "qwen", "model_path": "path/to/qwen.gguf", "price": [0.04, 0.08]},
     {"name": "served", "base_url": "http://127.0.0.1:8000/v1", "model": "served-name", "price": "0.15,0.6"}]

``price`` is USD per million input and output tokens, as ``--price`` takes it (a string, a pair,
or ``{"input": X, "output": Y}``), optionally with the cached input price (``"in=X,cached=Z,out=Y"``,
``[X, Z, Y]`` or ``{"input": X, "cached": Z, "output": Y}``). It is required: a model without one
cannot be held to a dollar budget, and a cascade that escalates without knowing what escalation
costs is guessing. An entry with neither ``model_path`` nor ``base_url`` is the embedded default
model (SmolLM2-135M).
Nothing is ever downloaded: a ``model_path`` must already exist.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apportion.budget.prices import price_from_json, price_to_json
from apportion.budget.units import Price
from apportion.errors import ApportionError, ConfigError

if TYPE_CHECKING:
    from apportion.banks import SampleBank
    from apportion.lm.base import Backend

_KEYS = {"name", "model_path", "base_url", "model", "price", "api_key_env"}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model of a models file."""

    name: str
    price: Price
    model_path: str | None = None
    base_url: str | None = None
    model: str | None = None
    """The name the server serves (``base_url``), or the embedded model's name in results."""
    api_key_env: str | None = None
    """The environment variable holding the server's API key (keys never go in the file)."""

    @property
    def backend_model(self) -> str:
        """The model name the backend reports, hence the name candidates carry."""
        return self.model or self.name

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "price": price_to_json(self.price)}
        for key in ("model_path", "base_url", "model", "api_key_env"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def parse_models(data: Any, source: str = "models file") -> tuple[ModelSpec, ...]:
    """The specs of a parsed models file; errors name the entry and what is wrong with it."""
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: expected a non-empty JSON list of models, "
                          '[{"name": ..., "price": "IN,OUT", "model_path" | "base_url": ...}, ...]')
    specs: list[ModelSpec] = []
    for number, raw in enumerate(data, 1):
        specs.append(_spec(raw, f"{source}: entry {number}" + (
            f" ({raw['name']!r})" if isinstance(raw, dict) and isinstance(raw.get("name"), str) else "")))
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: the name {name!r} is used by more than one entry")
    served = [s.backend_model for s in specs]
    for name in served:
        if served.count(name) > 1:  # candidates are told apart by the model that drew them
            raise ConfigError(f"{source}: more than one entry reports the model name {name!r}; "
                              "give each a distinct name or served model")
    return tuple(specs)


def _spec(raw: Any, where: str) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be a non-empty string")
    strings = {}
    for key in ("model_path", "base_url", "model", "api_key_env"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
        strings[key] = value
    if strings["model_path"] is not None and strings["base_url"] is not None:
        raise ConfigError(f"{where}: give 'model_path' (a GGUF file) or 'base_url' (a server), not both")
    if strings["base_url"] is not None and strings["model"] is None:
        raise ConfigError(f"{where}: 'base_url' needs 'model', the name the server serves")
    if strings["api_key_env"] is not None and strings["base_url"] is None:
        raise ConfigError(f"{where}: 'api_key_env' is for a server ('base_url')")
    if "price" not in raw:
        raise ConfigError(f"{where}: 'price' is required (USD per million input,output tokens, e.g. \"0.15,0.6\")")
    try:
        price = parse_price(raw["price"])
    except ApportionError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ModelSpec(name.strip(), price, strings["model_path"], strings["base_url"], strings["model"],
                     strings["api_key_env"])


def parse_price(value: Any) -> Price:
    """``"IN,OUT"``, ``[IN, OUT]`` or ``{"input": IN, "output": OUT}``, USD per million tokens; a
    cached input price as ``"IN,CACHED,OUT"``, ``[IN, CACHED, OUT]`` or ``{..., "cached": CACHED}``."""
    if isinstance(value, str):
        return Price.parse(value)
    price = None
    if not isinstance(value, dict) or set(value) <= {"input", "cached", "output"}:
        price = price_from_json(value)
    if price is None:
        raise ConfigError(f"a price is \"IN,OUT\", [IN, OUT] or {{\"input\": IN, \"output\": OUT}} (a cached "
                          f"input price as \"IN,CACHED,OUT\", [IN, CACHED, OUT] or \"cached\": CACHED), got {value!r}")
    return price


def load_models(path: str | Path) -> tuple[ModelSpec, ...]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read models file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a JSON models file ({exc})") from None
    return parse_models(data, str(path))


def build_backends(specs: Sequence[ModelSpec], timeout: str | None = None) -> dict[str, Backend]:
    """A backend per model, by name, built as the command line builds one (``--model-path``,
    ``--base-url``), so a models file means exactly what the same options would. Embedded models
    are loaded here: a missing file is reported before any work."""
    import os

    from apportion.cli._app import make_backend  # the one place options become a backend

    backends: dict[str, Backend] = {}
    try:
        for spec in specs:
            key = os.environ.get(spec.api_key_env) if spec.api_key_env else None
            if spec.api_key_env and key is None:
                raise ConfigError(f"model {spec.name!r}: ${spec.api_key_env} is not set")
            price = spec.price.to_text()
            backends[spec.name] = make_backend(
                spec.base_url, spec.backend_model, key, Path(spec.model_path) if spec.model_path else None,
                price, None, timeout)
    except ApportionError as exc:
        raise ConfigError(f"model {spec.name!r}: {exc}") from None
    return backends


@dataclass(frozen=True, slots=True)
class ModelCost:
    """What samples of one model cost: its price and typical prompt and sample lengths."""

    name: str
    price: Price
    prompt_tokens: float
    output_tokens: float
    """Mean output tokens per sample."""

    def usd(self, k: int) -> float:
        """Expected dollars of k samples in one batched call (the prompt paid once)."""
        p = self.price
        return (p.input_per_mtok * self.prompt_tokens + p.output_per_mtok * k * self.output_tokens) / 1e6

    def worst_usd(self, k: int, max_tokens: int) -> float:
        """The most k samples can cost: what the ledger reserves for them."""
        return float(self.price.cost(math.ceil(self.prompt_tokens), k * max_tokens))

    @classmethod
    def from_bank(cls, name: str, price: Price, bank: SampleBank) -> ModelCost:
        samples = [s.output_tokens for e in bank.entries for s in e.samples]
        return cls(name, price, statistics.fmean(e.prompt_tokens for e in bank.entries) if bank.entries else 0.0,
                   statistics.fmean(samples) if samples else 0.0)


def cost_table(costs: Sequence[ModelCost], ks: Sequence[int] = (1, 2, 4, 8, 16),
               max_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per model and sample count: expected (and, with ``max_tokens``, reserved) dollars."""
    rows = []
    for cost in costs:
        for k in ks:
            row: dict[str, Any] = {"model": cost.name, "k": k, "usd": cost.usd(k),
                                   "price": price_to_json(cost.price),
                                   "prompt_tokens": round(cost.prompt_tokens, 2),
                                   "output_tokens_per_sample": round(cost.output_tokens, 2)}
            if max_tokens is not None:
                row["worst_usd"] = cost.worst_usd(k, max_tokens)
            rows.append(row)
    return rows
