"""Reading ``summary.json``: the run and its rows as frozen dataclasses, every field checked on the way in.

Anything malformed is a ``ConfigError`` that names the file (and the row and field, where there is one).
The one-line subtitle that the plots and the page both show is made here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.errors import ConfigError

SUMMARY_NAME = "summary.json"
SUPPORTED_VERSION = 1
STOP_MARK = " --stop "


@dataclass(frozen=True, slots=True)
class LevelFigure:
    """Accuracy on the questions of one difficulty level."""

    accuracy: float
    questions: int | None


@dataclass(frozen=True, slots=True)
class Row:
    """One (system, algorithm, scorer, budget) measurement; token and dollar figures are means per question."""

    system: str
    algorithm: str
    scorer: str | None
    budget: int
    mode: str
    questions: int | None
    accuracy: float
    ci_low: float | None
    ci_high: float | None
    accuracy_std: float | None
    orders: int | None
    input_tokens: float | None
    output_tokens: float | None
    tokens: float | None
    usd: float | None
    wall_seconds: float | None
    wall_estimated: bool
    errors: int
    by_level: dict[str, LevelFigure]
    generations: float | None = None
    """Mean generations per question where the row says (a stopping rule's row: fewer than its budget)."""

    @property
    def stop_rule(self) -> str | None:
        """The stopping rule of a row ``apportion bench --stop`` added (``<algorithm> --stop <rule>``)."""
        return self.algorithm.split(STOP_MARK, 1)[1] if STOP_MARK in self.algorithm else None

    @property
    def base_algorithm(self) -> str:
        """The algorithm a stopping rule's row stopped (the algorithm itself for any other row)."""
        return self.algorithm.split(STOP_MARK, 1)[0]

    @property
    def mean_generations(self) -> float:
        return self.generations if self.generations is not None else float(self.budget)


@dataclass(frozen=True, slots=True)
class OraclePoint:
    """pass@k of the run's bank: a question is right when any of its first k samples is."""

    budget: int
    accuracy: float
    tokens: float | None
    output_tokens: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    version: int
    run: str
    dataset: str
    model: str
    backend: str
    created: str
    questions: int | None
    config: dict[str, Any]
    rows: tuple[Row, ...]
    oracle: tuple[OraclePoint, ...] = ()
    tokens_estimated: str | None = None
    """How the token counts were estimated, where they were (a bank that stored none)."""


def load_summary(run_dir: str | Path) -> Summary:
    """Read and check ``summary.json`` in a run directory (or the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / SUMMARY_NAME
    if not path.is_file():
        raise ConfigError(f"no {SUMMARY_NAME} at {path}: give the directory `apportion bench` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return _summary(data, path)


def merge_summaries(summaries: Sequence[Summary]) -> Summary:
    """One summary of several runs over the same questions (a grid run in pieces: more budgets of
    some algorithms, a peer run apart): their rows side by side. Runs of other datasets, models or
    question counts, or two runs measuring the same cell, are a ConfigError naming them; the
    config of each run is kept under its name."""
    if not summaries:
        raise ConfigError("no runs to report")
    if len(summaries) == 1:
        return summaries[0]
    first = summaries[0]
    seen: dict[tuple[str, str, str | None, int, str], str] = {}
    for summary in summaries:
        for field in ("dataset", "model", "questions"):
            if getattr(summary, field) != getattr(first, field):
                raise ConfigError(f"runs {first.run} and {summary.run} differ in {field} "
                                  f"({getattr(first, field)!r} against {getattr(summary, field)!r}): "
                                  "only runs over the same questions are reported together")
        for row in summary.rows:
            cell = (row.system, row.algorithm, row.scorer, row.budget, row.mode)
            if cell in seen:
                raise ConfigError(f"runs {seen[cell]} and {summary.run} both measure {row.system} "
                                  f"{row.algorithm} at budget {row.budget}: report them apart")
            seen[cell] = summary.run
    estimated = [s.tokens_estimated for s in summaries if s.tokens_estimated]
    return Summary(
        version=first.version,
        run=" + ".join(s.run for s in summaries),
        dataset=first.dataset,
        model=first.model,
        backend=" / ".join(dict.fromkeys(s.backend for s in summaries)),
        created=max(s.created for s in summaries),
        questions=first.questions,
        config={s.run: s.config for s in summaries},
        rows=tuple(row for s in summaries for row in s.rows),
        oracle=next((s.oracle for s in summaries if s.oracle), ()),
        tokens_estimated="; ".join(estimated) or None,
    )


def _summary(data: Mapping[str, Any], path: Path) -> Summary:
    version = data.get("version", SUPPORTED_VERSION)
    if version != SUPPORTED_VERSION:
        raise ConfigError(f"{path} has summary version {version!r}; this apportion reads version {SUPPORTED_VERSION}")
    raw_rows = data.get("rows")
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"{path} has no rows: the benchmark measured nothing to report")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: 'config' must be an object")
    return Summary(
        version=version,
        run=_text(data.get("run"), default=path.parent.name),
        dataset=_text(data.get("dataset")),
        model=_text(data.get("model")),
        backend=_text(data.get("backend")),
        created=_text(data.get("created")),
        questions=_int_or_none(data.get("questions"), f"{path}: 'questions'"),
        config=config,
        rows=tuple(_row(raw, i, path) for i, raw in enumerate(raw_rows)),
        oracle=_oracle(data.get("oracle"), path),
        tokens_estimated=None if data.get("tokens_estimated") in (None, "") else _text(data["tokens_estimated"]),
    )


def _oracle(raw: Any, path: Path) -> tuple[OraclePoint, ...]:
    if raw is None:
        return ()
    points = raw.get("points") if isinstance(raw, dict) else None
    if not isinstance(points, list):
        raise ConfigError(f"{path}: 'oracle' must be an object with a list of 'points'")
    out = []
    for i, point in enumerate(points):
        where = f"{path}: oracle point {i}"
        if not isinstance(point, dict):
            raise ConfigError(f"{where} must be an object")
        budget = _int_or_none(point.get("budget"), f"{where}: 'budget'")
        accuracy = _float_or_none(point.get("accuracy"), f"{where}: 'accuracy'")
        if budget is None or budget < 1 or accuracy is None:
            raise ConfigError(f"{where} needs a positive 'budget' and an 'accuracy'")
        out.append(OraclePoint(budget, accuracy, _float_or_none(point.get("tokens"), f"{where}: 'tokens'"),
                               _float_or_none(point.get("output_tokens"), f"{where}: 'output_tokens'")))
    return tuple(sorted(out, key=lambda p: p.budget))


def _row(raw: Any, index: int, path: Path) -> Row:
    where = f"{path} row {index}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be an object")
    for key in ("system", "algorithm", "budget", "accuracy"):
        if raw.get(key) is None:
            raise ConfigError(f"{where} lacks {key!r}")

    def num(key: str) -> float | None:
        return _float_or_none(raw.get(key), f"{where}: {key!r}")

    budget = _int_or_none(raw["budget"], f"{where}: 'budget'")
    if budget is None or budget < 1:
        raise ConfigError(f"{where}: 'budget' must be a positive integer, not {raw['budget']!r}")
    accuracy = num("accuracy")
    if accuracy is None:
        raise ConfigError(f"{where}: 'accuracy' must be a number, not {raw['accuracy']!r}")
    tokens = num("tokens")
    if tokens is None and raw.get("input_tokens") is not None and raw.get("output_tokens") is not None:
        tokens = (num("input_tokens") or 0.0) + (num("output_tokens") or 0.0)
    scorer = raw.get("scorer")
    return Row(
        system=_text(raw["system"]),
        algorithm=_text(raw["algorithm"]),
        scorer=None if scorer in (None, "") else _text(scorer),
        budget=budget,
        mode=_text(raw.get("mode"), default=""),
        questions=_int_or_none(raw.get("questions"), f"{where}: 'questions'"),
        accuracy=accuracy,
        ci_low=num("ci_low"),
        ci_high=num("ci_high"),
        accuracy_std=num("accuracy_std"),
        orders=_int_or_none(raw.get("orders"), f"{where}: 'orders'"),
        input_tokens=num("input_tokens"),
        output_tokens=num("output_tokens"),
        tokens=tokens,
        usd=num("usd"),
        wall_seconds=num("wall_seconds"),
        wall_estimated=bool(raw.get("wall_estimated", False)),
        errors=_int_or_none(raw.get("errors"), f"{where}: 'errors'") or 0,
        by_level=_levels(raw.get("by_level"), where),
        generations=num("generations"),
    )


def _levels(raw: Any, where: str) -> dict[str, LevelFigure]:
    if raw in (None, {}):
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'by_level' must be an object")
    levels = {}
    for level, figure in raw.items():
        if not isinstance(figure, dict) or figure.get("accuracy") is None:
            raise ConfigError(f"{where}: by_level[{level!r}] needs an 'accuracy'")
        accuracy = _float_or_none(figure["accuracy"], f"{where}: by_level[{level!r}]")
        if accuracy is None:
            continue
        levels[str(level)] = LevelFigure(accuracy, _int_or_none(figure.get("questions"), f"{where}: by_level"))
    return levels


def _text(value: Any, default: str = "?") -> str:
    return default if value is None else str(value)


def _float_or_none(value: Any, what: str) -> float | None:
    if value is None:
        return None
    # bool is an int to Python, but true as an accuracy is a writer's bug worth reporting
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} must be a number, not {value!r}")
    return float(value) if math.isfinite(value) else None


def _int_or_none(value: Any, what: str) -> int | None:
    number = _float_or_none(value, what)
    if number is None:
        return None
    if not number.is_integer():
        raise ConfigError(f"{what} must be a whole number, not {value!r}")
    return int(number)


def _subtitle(summary: Summary) -> str:
    count = f"{summary.questions} questions" if summary.questions is not None else "questions: ?"
    estimated = " · tokens estimated" if summary.tokens_estimated else ""
    return f"{summary.dataset} · {summary.model} · {count}{estimated}"
