"""Which algorithm a request runs, and under what budget: its ``apportion`` object, or a prefix of
its model name.

The ``apportion`` object (every field optional but ``algorithm``)::

    {"algorithm": "self-consistency",            # a registry name or alias (sc, bon, beam...)
     "budget": {"generations": 8, "tokens": 4000},  # or 8, or "gen=8,tokens=4000"; the CLI's aliases
     "stop": "esc",                               # a stopping rule, as ``--stop``
     "settings": {"rounds": "1"},                 # the algorithm's own settings, as ``--set``
     "scorer": "self-certainty",                  # best-of-N's outcome scorer
     "process_scorer": "judge",                   # a step-wise search's, among those the server offers
     "candidates": true,                          # every candidate in the response's apportion field
     "trace": true,                               # and the per-call trace
     "answers": "text"}                           # compare whole replies (free-form chat), or "judge", "math"

The model-name prefix, ``<algorithm>[-<N>]/<model>``: ``sc-8/<model>`` is self-consistency with 8
generations, ``best-of-n-16/<model>`` best-of-N with 16, ``dvts/<model>`` DVTS under the server's
default budget. ``<model>`` must be the served model's name, and ``<algorithm>`` a name or alias of
the registry (the last ``-<digits>`` is the budget, so ``best-of-n`` keeps its own hyphens). A
planning run over another base is chosen by the ``apportion`` object only (``planning/dvts``: the
slash already separates the prefix). Both may be given when they agree: the prefix's algorithm must
be the object's, and its N the object's generations if the object's budget sets them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apportion.algorithms.registry import ALGORITHMS, PLANNING, canonical
from apportion.budget.units import Budget
from apportion.errors import BudgetError
from apportion.serve._requests import RequestError

APPORTION_KEYS = frozenset({"algorithm", "budget", "stop", "settings", "scorer", "process_scorer", "candidates",
                            "trace", "answers"})
_PREFIX = re.compile(r"(?P<name>.+?)(?:-(?P<n>\d+))?")


@dataclass(frozen=True, slots=True)
class AlgorithmChoice:
    """What a request asked to run, as read from it (the server's defaults and maxima not yet applied)."""

    algorithm: str
    """The registry's name (aliases resolved)."""
    budget: Budget | None = None
    """None: the server's default budget."""
    stop: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    scorer: str | None = None
    process_scorer: str | None = None
    candidates: bool = False
    trace: bool = False
    answers: str | None = None
    """How candidates' answers are compared: "math" (a final answer read from each), "text" (the
    whole reply, normalised) or "judge" (the model clusters replies); None: the server's default."""


@dataclass(frozen=True, slots=True)
class Routing:
    """The model a request named (any prefix taken off) and the algorithm it chose (None: a plain backend call)."""

    model: str | None
    choice: AlgorithmChoice | None


def route(body: Mapping[str, Any], served: str) -> Routing:
    """The request's model and algorithm, from its ``model`` and ``apportion`` fields (a 400 that
    names the field for anything malformed; the model is checked against ``served`` by the caller)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    prefix = split_model(model, served) if model is not None else None
    raw = body.get("apportion")
    if raw is None:
        if prefix is None:
            return Routing(model, None)
        name, generations = prefix[1], prefix[2]
        return Routing(prefix[0], AlgorithmChoice(name, None if generations is None else _generations(generations)))
    choice = read_choice(raw)
    if prefix is None:
        return Routing(model, choice)
    return Routing(prefix[0], _merge(choice, prefix[1], prefix[2], model or ""))


def split_model(model: str, served: str) -> tuple[str, str, int | None] | None:
    """(model, algorithm, generations) of ``<algorithm>[-<N>]/<model>``; None where ``model`` has
    no such prefix (the served name itself, or a name whose first segment is not an algorithm)."""
    if model == served:
        return None
    head, slash, rest = model.partition("/")
    found = _PREFIX.fullmatch(head) if slash and rest else None
    if found is None:
        return None
    name = canonical(found.group("name"))
    if name not in ALGORITHMS:
        if rest == served:  # meant as a prefix, surely: say which names there are
            raise RequestError(f"model {model!r}: unknown algorithm {found.group('name')!r} in the prefix; known: "
                               f"{', '.join(ALGORITHMS)}", param="model", code="unknown_algorithm")
        return None
    n = found.group("n")
    return rest, name, None if n is None else int(n)


def read_choice(raw: Any) -> AlgorithmChoice:
    """The ``apportion`` object of a request body."""
    if not isinstance(raw, dict):
        raise RequestError("apportion must be an object, e.g. {\"algorithm\": \"self-consistency\", "
                           "\"budget\": {\"generations\": 8}}", param="apportion")
    raw = {k: v for k, v in raw.items() if v is not None}
    unknown = sorted(set(raw) - APPORTION_KEYS)
    if unknown:
        raise RequestError(f"apportion has unknown field(s): {', '.join(unknown)}; known: "
                           f"{', '.join(sorted(APPORTION_KEYS))}", param=f"apportion.{unknown[0]}")
    if "algorithm" not in raw:
        raise RequestError("apportion.algorithm is required (e.g. \"self-consistency\"; known: "
                           f"{', '.join(ALGORITHMS)})", param="apportion.algorithm")
    return AlgorithmChoice(
        algorithm=algorithm_name(_string(raw, "algorithm")),
        budget=read_budget(raw["budget"]) if "budget" in raw else None,
        stop=_string(raw, "stop") if "stop" in raw else None,
        settings=_settings(raw.get("settings", {})),
        scorer=_string(raw, "scorer") if "scorer" in raw else None,
        process_scorer=_string(raw, "process_scorer") if "process_scorer" in raw else None,
        candidates=_flag(raw, "candidates"),
        trace=_flag(raw, "trace"),
        answers=_string(raw, "answers") if "answers" in raw else None,
    )


def algorithm_name(name: str) -> str:
    """The registry's name for ``name``, or a 400 listing the known ones (``planning/<base>`` included)."""
    key = canonical(name)
    head, slash, base = key.partition("/")
    known = head in ALGORITHMS and (not slash or (head == PLANNING and base in ALGORITHMS and base != PLANNING))
    if not known:
        raise RequestError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}, and "
                           "planning/<base> (e.g. planning/beam-search)", param="apportion.algorithm",
                           code="unknown_algorithm")
    return key


def read_budget(raw: Any, param: str = "apportion.budget") -> Budget:
    """A budget as a number of generations (8), the CLI's text ("gen=8,tokens=4000"), or an object
    of units, each a name or alias of the CLI's (``{"gen": 8, "tokens": 4000}``)."""
    try:
        if isinstance(raw, bool):
            raise BudgetError(f"must be a number, text or an object of units, got {raw!r}")
        if isinstance(raw, (int, float, str)):
            return Budget.parse(raw)
        if isinstance(raw, dict):
            return Budget.parse(_units_text(raw)) if raw else Budget()
        raise BudgetError(f"must be a number, text or an object of units, got {type(raw).__name__}")
    except BudgetError as exc:
        raise RequestError(f"{param}: {exc}", param=param, code="invalid_budget") from None


def _units_text(raw: dict[Any, Any]) -> str:
    parts = []
    for unit, value in raw.items():
        if not isinstance(unit, str) or not unit.strip() or any(c in unit for c in ",="):
            raise BudgetError(f"unit {unit!r} is not a unit name")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BudgetError(f"{unit} must be a number, got {value!r}")
        parts.append(f"{unit}={value!r}")
    return ",".join(parts)


def _generations(n: int) -> Budget:
    try:
        return Budget(generations=n)
    except BudgetError as exc:
        raise RequestError(f"model prefix: {exc}", param="model", code="invalid_budget") from None


def _merge(choice: AlgorithmChoice, name: str, generations: int | None, model: str) -> AlgorithmChoice:
    if choice.algorithm != name:
        raise RequestError(f"the model prefix of {model!r} asks for {name} but apportion.algorithm for "
                           f"{choice.algorithm}: send one, or make them agree", param="apportion.algorithm")
    if generations is None:
        return choice
    if choice.budget is None:
        return replace(choice, budget=_generations(generations))
    if choice.budget.generations is None:
        return replace(choice, budget=replace(choice.budget, generations=generations))
    if choice.budget.generations != generations:
        raise RequestError(f"the model prefix of {model!r} asks for {generations} generations but apportion.budget "
                           f"for {choice.budget.generations}: send one, or make them agree", param="apportion.budget")
    return choice


def cap(budget: Budget, maxima: Sequence[tuple[Budget, str]]) -> Budget:
    """``budget`` within every maximum: a unit over one is a 400 naming that limit (each maximum
    comes with whose it is: "this server's", "this key's"); a unit the budget leaves unlimited takes
    the least of the maxima's limits."""
    for maximum, whose in maxima:
        over = [f"{unit} {getattr(budget, unit):g} > {limit:g}" for unit, limit in maximum.limits().items()
                if getattr(budget, unit) is not None and getattr(budget, unit) > limit]
        if over:
            raise RequestError(f"the budget asks for more than {whose} maximum per request ({maximum}): "
                               f"{', '.join(over)}", param="apportion.budget", code="budget_too_large")
    unset: dict[str, Any] = {}
    for maximum, _ in maxima:
        for unit, limit in maximum.limits().items():
            if getattr(budget, unit) is None:
                unset[unit] = min(limit, unset.get(unit, limit))
    return replace(budget, **unset) if unset else budget


def _string(raw: Mapping[str, Any], key: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"apportion.{key} must be a non-empty string, got {value!r}", param=f"apportion.{key}")
    return value


def _flag(raw: Mapping[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"apportion.{key} must be true or false, got {value!r}", param=f"apportion.{key}")
    return value


def _settings(raw: Any) -> dict[str, str]:
    """``--set KEY=VALUE`` as an object: values may be text, numbers or booleans (read as the CLI reads text)."""
    if not isinstance(raw, dict):
        raise RequestError("apportion.settings must be an object of setting: value", param="apportion.settings")
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = key.strip().replace("-", "_")
        if not name:
            raise RequestError("apportion.settings has an empty name", param="apportion.settings")
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            out[name] = str(value)
        else:
            raise RequestError(f"apportion.settings.{key} must be text, a number or a boolean, got {value!r}",
                               param=f"apportion.settings.{key}")
    return out
