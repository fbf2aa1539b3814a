"""The Pareto frontier of a run over (cost, latency, accuracy), and the configuration a user-weighted
utility picks.

A configuration is one row of ``summary.json`` (system, algorithm, scorer, budget, stopping rule). Its
cost is a mean per question: tokens (input + output), dollars, or generations; its latency is the cell's
wall seconds over its questions. Both are to be small and accuracy large; a configuration is on the
frontier when no other is at least as good on all three and better on one.

The utility, in accuracy points (percentage points), is

    U = 100 * accuracy - w_cost * cost / per - w_latency * seconds

with ``per`` = 1,000 tokens, one dollar or one generation (so w_cost is points per 1k tokens, per dollar
or per generation) and w_latency in points per second. With weights of zero or more the best U is always
reached on the frontier. Costs are taken as known; the accuracy interval carries over to U unchanged, and
the winner is called separated from the runner-up only where their intervals do not overlap.

Nothing here imports the report package at run time: the report imports this module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apportion.errors import ConfigError

if TYPE_CHECKING:
    from apportion.bench.report.summary import Row

PARETO_NAME = "pareto.json"
AUTO = "auto"


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, every coordinate to be minimised.

    A point dominates another when it is no larger in every coordinate and smaller in one. Points equal
    in every coordinate do not dominate each other; the first of them (lowest index) stands for all, so
    each frontier point appears once. Returned in lexicographic order of the coordinates, then index.
    Points with a non-finite coordinate are ignored.
    """
    finite = [i for i, p in enumerate(points) if all(math.isfinite(x) for x in p)]
    order = sorted(finite, key=lambda i: (tuple(points[i]), i))
    kept: list[int] = []
    # whatever dominates or equals a point sorts before it, and is itself matched by a point already
    # kept, so comparing with the kept points alone is enough
    for i in order:
        if not any(all(a <= b for a, b in zip(points[k], points[i], strict=True)) for k in kept):
            kept.append(i)
    return kept


@dataclass(frozen=True, slots=True)
class CostUnit:
    name: str
    column: str
    meaning: str
    per: float
    """The cost weight is in accuracy points per this much of the unit."""
    weight_unit: str
    of: Callable[[Row], float | None]


def _tokens(row: Row) -> float | None:
    # zero tokens is a bank that counted none, not a free configuration
    return row.tokens if row.tokens is not None and row.tokens > 0 else None


def _usd(row: Row) -> float | None:
    return row.usd if row.usd is not None and row.usd >= 0 else None


def _generations(row: Row) -> float | None:
    return row.mean_generations


COST_UNITS = {
    "tokens": CostUnit("tokens", "mean tokens", "mean tokens per question (input + output)", 1000.0,
                       "accuracy points per 1,000 tokens", _tokens),
    "usd": CostUnit("usd", "$ / question", "mean dollars per question", 1.0, "accuracy points per dollar", _usd),
    "generations": CostUnit("generations", "mean generations", "mean generations per question", 1.0,
                            "accuracy points per generation", _generations),
}
LATENCY_UNIT = "accuracy points per second"


def latency_of(row: Row) -> float | None:
    """Wall seconds per question; None where unknown (a bank without request times records 0)."""
    if row.wall_seconds is None or row.wall_seconds <= 0 or not row.questions:
        return None
    return row.wall_seconds / row.questions


@dataclass(frozen=True, slots=True)
class Weights:
    cost: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cost", "latency"):
            value = getattr(self, name)
            # a negative weight would reward spending, and the best utility would leave the frontier
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"weight {name}={value!r} must be a finite number of 0 or more")


def parse_weights(text: str) -> Weights:
    """``cost=0.5,latency=0.01`` (either may be left out, each given at most once)."""
    given: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise ConfigError(f"--weights: {part.strip()!r} is not NAME=NUMBER (e.g. cost=0.5,latency=0.01)")
        if key not in ("cost", "latency"):
            raise ConfigError(f"--weights: unknown weight {key!r}; the weights are cost and latency")
        if key in given:
            raise ConfigError(f"--weights: {key} is given twice")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--weights: {key}={value!r} is not a number") from None
        if not math.isfinite(number) or number < 0:
            raise ConfigError(f"--weights: {key}={value} must be a finite number of 0 or more "
                              "(a negative weight would reward spending)")
        given[key] = number
    return Weights(**given)


def cost_unit(rows: Sequence[Row], name: str | None) -> CostUnit:
    """The named unit, or for ``auto``/None tokens where any row counted them, else generations."""
    if name in (None, AUTO):
        return COST_UNITS["tokens" if any(_tokens(r) is not None for r in rows) else "generations"]
    unit = COST_UNITS.get(name)
    if unit is None:
        raise ConfigError(f"unknown cost unit {name!r}: use {', '.join(COST_UNITS)}")
    if not any(unit.of(r) is not None for r in rows):
        raise ConfigError(f"no row of this run reports {name}; use --cost generations")
    return unit


@dataclass(frozen=True, slots=True)
class Point:
    index: int
    """The row's position in ``summary.json``."""
    row: Row
    cost: float
    latency: float | None
    utility: float
    utility_interval: tuple[float, float] | None
    ties: tuple[int, ...] = ()
    """Other rows with exactly these coordinates, which this one stands for on the frontier."""

    def to_dict(self) -> dict[str, Any]:
        r = self.row
        low, high = self.utility_interval if self.utility_interval is not None else (None, None)
        return {"row": self.index, "system": r.system, "algorithm": r.algorithm, "scorer": r.scorer,
                "budget": r.budget, "mode": r.mode, "accuracy": r.accuracy, "ci_low": r.ci_low,
                "ci_high": r.ci_high, "cost": self.cost, "latency": self.latency,
                "latency_estimated": r.wall_estimated if self.latency is not None else None,
                "utility": self.utility, "utility_low": low, "utility_high": high, "ties": list(self.ties)}


@dataclass(frozen=True, slots=True)
class Pareto:
    cost: CostUnit
    weights: Weights
    latency: bool
    """Whether latency is an axis (every placed row has a wall time)."""
    points: tuple[Point, ...]
    frontier: tuple[Point, ...]
    """Cheapest first, then fastest, then most accurate."""
    winner: Point
    runner_up: Point | None
    left_out: tuple[int, ...]
    notes: tuple[str, ...]

    @property
    def separated(self) -> bool | None:
        """Whether the winner's utility interval lies wholly above the runner-up's (None: no intervals)."""
        if self.runner_up is None or self.winner.utility_interval is None or self.runner_up.utility_interval is None:
            return None
        return self.winner.utility_interval[0] > self.runner_up.utility_interval[1]

    @property
    def close(self) -> tuple[Point, ...]:
        """Other configurations whose utility interval reaches the winner's: the data do not rule them out."""
        if self.winner.utility_interval is None:
            return ()
        floor = self.winner.utility_interval[0]
        same = {self.winner.index, *self.winner.ties}
        return tuple(p for p in self.points if p.index not in same
                     and p.utility_interval is not None and p.utility_interval[1] >= floor)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cost": self.cost.name, "cost_is": self.cost.meaning,
            "latency": "wall seconds per question" if self.latency else None,
            "weights": {"cost": self.weights.cost, "latency": self.weights.latency,
                        "units": {"cost": self.cost.weight_unit, "latency": LATENCY_UNIT}},
            "utility": f"U = 100 * accuracy - w_cost * {self.cost.name} / {self.cost.per:g} - w_latency * seconds, "
                       "in accuracy points",
            "frontier": [p.to_dict() for p in self.frontier],
            "winner": self.winner.to_dict(),
            "runner_up": None if self.runner_up is None else self.runner_up.to_dict(),
            "separated": self.separated,
            "close": [p.index for p in self.close],
            "left_out": list(self.left_out),
            "notes": list(self.notes),
        }


def analyse(rows: Sequence[Row], cost: str | None = AUTO, weights: Weights | None = None) -> Pareto:
    """The frontier and the utility winner of a run's rows (``summary.json``, in its order)."""
    weights = weights or Weights()
    if not rows:
        raise ConfigError("no rows: nothing to compare")
    unit = cost_unit(rows, cost)
    placed = [(i, r, c) for i, r in enumerate(rows) if (c := unit.of(r)) is not None]
    left_out = tuple(i for i, r in enumerate(rows) if unit.of(r) is None)
    notes = [f"{len(left_out)} row(s) report no {unit.name} and are left out"] if left_out else []
    latencies = [latency_of(r) for _, r, _ in placed]
    use_latency = all(s is not None for s in latencies)
    if not use_latency:
        why = ("no row has a wall time" if all(s is None for s in latencies)
               else f"{sum(s is None for s in latencies)} row(s) have no wall time")
        if weights.latency > 0:
            raise ConfigError(f"a latency weight needs every row's wall time, and {why}")
        notes.append(f"latency is left out of the frontier: {why}")
    elif any(r.wall_estimated for _, r, _ in placed):
        notes.append("wall times of replayed rows are estimates (the bank's request times scaled to the tokens)")
    points = [_point(i, r, c, s if use_latency else None, unit, weights)
              for (i, r, c), s in zip(placed, latencies, strict=True)]
    coords = [_coords(p)[:3] for p in points]
    frontier = tuple(_with_ties(points[k], points, coords) for k in non_dominated(coords))
    # max keeps the first of equals: ties in utility go to the frontier's order, the cheaper, then the faster
    winner = max(frontier, key=lambda p: p.utility)
    same = {winner.index, *winner.ties}
    others = sorted((p for p in points if p.index not in same), key=_coords)
    runner_up = max(others, key=lambda p: p.utility) if others else None
    return Pareto(unit, weights, use_latency, tuple(points), frontier, winner, runner_up, left_out, tuple(notes))


def _point(index: int, row: Row, cost: float, latency: float | None, unit: CostUnit, weights: Weights) -> Point:
    penalty = weights.cost * cost / unit.per + (weights.latency * latency if latency is not None else 0.0)
    interval = None
    if row.ci_low is not None and row.ci_high is not None:
        interval = (100 * row.ci_low - penalty, 100 * row.ci_high - penalty)
    return Point(index, row, cost, latency, 100 * row.accuracy - penalty, interval)


def _coords(p: Point) -> tuple[float, float, float, int]:
    # the index last orders exact ties; only the first three are compared for dominance
    return (p.cost, p.latency if p.latency is not None else 0.0, -p.row.accuracy, p.index)


def _with_ties(point: Point, points: Sequence[Point], coords: Sequence[tuple[float, ...]]) -> Point:
    mine = _coords(point)[:3]
    ties = tuple(p.index for p, c in zip(points, coords, strict=True) if c == mine and p.index != point.index)
    return Point(point.index, point.row, point.cost, point.latency, point.utility, point.utility_interval, ties)


def describe(row: Row) -> str:
    """A configuration in words, e.g. ``apportion: best-of-n (self-certainty) @8``."""
    scorer = f" ({row.scorer})" if row.scorer else ""
    return f"{row.system}: {row.algorithm}{scorer} @{row.budget}"


def format_cost(unit: CostUnit, value: float) -> str:
    if unit.name == "usd":
        # dollars per question are often fractions of a cent
        return f"${value:.4f}" if value == 0 or value >= 0.001 else f"${value:.2e}"
    return f"{value:,.1f}" if unit.name == "tokens" else f"{value:.2f}"


def save(run_dir: Path, result: Pareto) -> Path:
    out = run_dir / PARETO_NAME
    out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def load_choice(run_dir: Path) -> tuple[str, Weights]:
    """The cost unit and weights ``apportion bench pareto`` last used on this run, so the report shows
    the same winner; tokens (or generations) and no weights where it has not run."""
    path = run_dir / PARETO_NAME
    if not path.is_file():
        return AUTO, Weights()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cost, weights = data["cost"], data["weights"]
        chosen = Weights(float(weights["cost"]), float(weights["latency"]))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, ConfigError) as exc:
        raise ConfigError(f"{path} is not a pareto.json of `apportion bench pareto` ({exc}); "
                          "run that again or delete the file") from exc
    if not isinstance(cost, str):
        raise ConfigError(f"{path}: 'cost' must be a unit name, not {cost!r}")
    return cost, chosen
