"""Scaling laws: accuracy as a function of spend, P(N) = a * N^b + c, fitted to measured points.

N is any positive spend (samples per question, tokens per question). For a fixed exponent b the
law is linear in (a, c), so the fit is exact least squares for every b on a grid over [-3, 3] and
then a golden-section refinement of b around the best grid point (variable projection): no
starting guess, no optimiser that can wander off, and the same answer on every run.

Accuracy curves of repeated sampling rise and flatten: a < 0, b < 0 and c the ceiling. A fit says
how far it can be trusted three ways: held-out error (each measured budget predicted from a fit to
the others, and the largest predicted from the smaller ones, which is the extrapolation a user
asks for), bootstrap intervals over questions (refit on questions drawn with replacement), and a
warning on every prediction outside the measured range.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from apportion.errors import ConfigError

_B_GRID = np.linspace(-3.0, 3.0, 121)
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True, slots=True)
class ScalingLaw:
    a: float
    b: float
    c: float
    lowest: float
    """The smallest spend measured (predictions below it extrapolate)."""
    highest: float
    """The largest spend measured (predictions above it extrapolate)."""
    rmse: float = 0.0
    """Root mean squared error of the fit on its own points."""

    def value(self, n: float) -> float:
        return self.a * n**self.b + self.c

    def predict(self, n: float) -> Prediction:
        if n <= 0:
            raise ConfigError(f"a spend must be positive, got {n}")
        warnings = []
        if n > self.highest * (1 + 1e-9) or n < self.lowest * (1 - 1e-9):
            warnings.append(f"{n:g} lies outside the measured range [{self.lowest:g}, {self.highest:g}]: "
                            "an extrapolation, to be trusted less the further out it goes")
        return Prediction(n, min(1.0, max(0.0, self.value(n))), tuple(warnings))

    @property
    def ceiling(self) -> float | None:
        """The accuracy the law approaches with unlimited spend (None where it grows without bound)."""
        if self.b < 0:
            return self.c
        return None if self.a > 0 and self.b > 0 else self.c + self.a

    def budget_for(self, target: float) -> Prediction | None:
        """The spend at which the law reaches ``target`` accuracy; None where it never does."""
        if self.a == 0 or self.b == 0:
            return None
        ratio = (target - self.c) / self.a
        if ratio <= 0:
            return None
        n = ratio ** (1 / self.b)
        if not math.isfinite(n) or n <= 0:
            return None
        return self.predict(n)


@dataclass(frozen=True, slots=True)
class Prediction:
    spend: float
    accuracy: float
    warnings: tuple[str, ...] = ()

    @property
    def extrapolated(self) -> bool:
        return bool(self.warnings)


@dataclass(frozen=True, slots=True)
class Fit:
    """A law with its credentials: held-out errors and bootstrap intervals (95%)."""

    law: ScalingLaw
    loo_error: float | None
    """Mean absolute error predicting each measured point from a fit to the others."""
    extrapolation_error: float | None
    """Absolute error predicting the largest measured spend from a fit to the smaller ones."""
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Bootstrap intervals over questions for a, b, c (where per-question data were given)."""
    bootstrap: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"law": asdict(self.law), "loo_error": self.loo_error,
                "extrapolation_error": self.extrapolation_error,
                "intervals": {k: list(v) for k, v in self.intervals.items()}, "bootstrap": self.bootstrap}

    def interval_at(self, n: float, per_question: Sequence[Sequence[float]], spends: Sequence[float],
                    draws: int = 200, seed: int = 0) -> tuple[float, float]:
        """A 95% bootstrap interval for the accuracy the law predicts at ``n``."""
        values = [law.predict(n).accuracy for law in _bootstrap_laws(spends, per_question, draws, seed)]
        return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def fit_law(spends: Sequence[float], accuracies: Sequence[float]) -> ScalingLaw:
    """Least squares over (a, b, c); at least three distinct positive spends."""
    x = np.asarray(spends, dtype=float)
    y = np.asarray(accuracies, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ConfigError("one accuracy per spend is needed")
    if len(set(x.tolist())) < 3:
        raise ConfigError(f"a law of three parameters needs at least three distinct spends, got {sorted(set(x))}")
    if np.any(x <= 0) or not np.all(np.isfinite(y)):
        raise ConfigError("spends must be positive and accuracies finite")
    errors = [_sse(x, y, b)[0] for b in _B_GRID]
    best = int(np.argmin(errors))
    low, high = _B_GRID[max(0, best - 1)], _B_GRID[min(len(_B_GRID) - 1, best + 1)]
    for _ in range(40):
        m1 = high - _GOLDEN * (high - low)
        m2 = low + _GOLDEN * (high - low)
        if _sse(x, y, m1)[0] <= _sse(x, y, m2)[0]:
            high = m2
        else:
            low = m1
    b = (low + high) / 2
    if _sse(x, y, _B_GRID[best])[0] < _sse(x, y, b)[0]:
        b = float(_B_GRID[best])
    sse, a, c = _sse(x, y, b)
    return ScalingLaw(a, float(b), c, float(x.min()), float(x.max()), math.sqrt(sse / len(x)))


def _sse(x: np.ndarray, y: np.ndarray, b: float) -> tuple[float, float, float]:
    """The least-squares (a, c) for exponent ``b``, with c (the ceiling or the floor of an
    accuracy curve) held in [0, 1], and their summed squared error. At b = 0 the two columns
    coincide and lstsq returns the minimum-norm split: a constant fit, as it should."""
    feature = x**b
    design = np.column_stack([feature, np.ones_like(x)])
    (a, c), *_ = np.linalg.lstsq(design, y, rcond=None)
    if not 0 <= c <= 1:
        c = min(1.0, max(0.0, c))
        scale = float(feature @ feature)
        a = float(feature @ (y - c)) / scale if scale > 0 else 0.0
    residual = y - (a * feature + c)
    return float(residual @ residual), float(a), float(c)


def fit(spends: Sequence[float], accuracies: Sequence[float] | None = None, *,
        per_question: Sequence[Sequence[float]] | None = None, bootstrap: int = 200, seed: int = 0) -> Fit:
    """Fit the law, validate it on held-out budgets, and (given each question's rate of being right
    at every spend, ``per_question[q][i]``) bootstrap over questions."""
    if accuracies is None:
        if per_question is None:
            raise ConfigError("give the accuracies, or each question's results")
        accuracies = np.mean(np.asarray(per_question, dtype=float), axis=0).tolist()
    law = fit_law(spends, accuracies)
    points = sorted(zip(spends, accuracies))
    loo = extrapolation = None
    if len({s for s, _ in points}) >= 4:
        errs = []
        for i in range(len(points)):
            rest = points[:i] + points[i + 1:]
            held = fit_law([s for s, _ in rest], [v for _, v in rest])
            errs.append(abs(held.value(points[i][0]) - points[i][1]))
        loo = float(np.mean(errs))
        smaller = points[:-1]
        extrapolation = abs(fit_law([s for s, _ in smaller], [v for _, v in smaller]).value(points[-1][0])
                            - points[-1][1])
    intervals: dict[str, tuple[float, float]] = {}
    if per_question is not None and bootstrap:
        laws = _bootstrap_laws(spends, per_question, bootstrap, seed)
        for name in ("a", "b", "c"):
            values = [getattr(fitted, name) for fitted in laws]
            intervals[name] = (float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975)))
    return Fit(law, loo, extrapolation, intervals, bootstrap if intervals else 0)


def _bootstrap_laws(spends: Sequence[float], per_question: Sequence[Sequence[float]], draws: int,
                    seed: int) -> list[ScalingLaw]:
    table = np.asarray(per_question, dtype=float)
    if table.ndim != 2 or table.shape[1] != len(spends):
        raise ConfigError("per_question needs one row per question and one column per spend")
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(draws):
        rows = table[rng.integers(0, len(table), size=len(table))]
        laws.append(fit_law(spends, rows.mean(axis=0).tolist()))
    return laws


class FitCache:
    """Fits saved per (model, task, algorithm, unit) in one JSON file, so that an allocator reuses
    a law instead of re-measuring it. A fit is replaced when its inputs change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, dict[str, object]]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.path}: not a scaling-law cache ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.path}: not a scaling-law cache")
        return data

    @staticmethod
    def key(model: str, task: str, algorithm: str, unit: str) -> str:
        return json.dumps([model, task, algorithm, unit])

    def get(self, model: str, task: str, algorithm: str, unit: str) -> ScalingLaw | None:
        entry = self._load().get(self.key(model, task, algorithm, unit))
        if not isinstance(entry, dict) or not isinstance(entry.get("law"), dict):
            return None
        try:
            return ScalingLaw(**entry["law"])  # type: ignore[arg-type]
        except TypeError:
            return None

    def put(self, model: str, task: str, algorithm: str, unit: str, fitted: Fit) -> None:
        data = self._load()
        data[self.key(model, task, algorithm, unit)] = fitted.to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(self.path.suffix + ".partial")
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        partial.replace(self.path)
