"""Scaling laws fitted to a benchmark run: each uniform curve of ``results.jsonl`` (one
algorithm at several budgets), against generations and against output tokens, with held-out
errors and bootstrap intervals over questions (``allocate.scaling``)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apportion.allocate.scaling import Fit, FitCache, Prediction, fit
from apportion.errors import ConfigError
from apportion.files import jsonl_lines


@dataclass(frozen=True, slots=True)
class CurveFit:
    algorithm: str
    unit: str
    spends: tuple[float, ...]
    accuracies: tuple[float, ...]
    fit: Fit
    beyond: Prediction
    """The law's accuracy at twice the largest spend measured (an extrapolation, flagged)."""
    target: Prediction | None
    """The spend the law says reaches the target accuracy (None: never, or no target)."""

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "unit": self.unit, "spends": list(self.spends),
                "accuracies": list(self.accuracies), **self.fit.to_dict(),
                "beyond": _prediction(self.beyond), "target": _prediction(self.target)}


def _prediction(p: Prediction | None) -> dict[str, Any] | None:
    return None if p is None else {"spend": p.spend, "accuracy": p.accuracy, "warnings": list(p.warnings)}


def fit_run(run: Path, *, target: float | None = None, bootstrap: int = 200, seed: int = 0) -> list[CurveFit]:
    results = run / "results.jsonl"
    if not results.is_file():
        raise ConfigError(f"{run} has no results.jsonl (run `apportion bench` first)")
    # (algorithm label) -> budget -> question -> (right rate, output tokens)
    table: dict[str, dict[int, dict[str, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for line in jsonl_lines(results):
        if line.error is not None:
            raise ConfigError(f"{results}: {line.error}")
        row = line.value
        if not isinstance(row, dict) or "--stop" in str(row.get("algorithm")) or row.get("error"):
            continue
        label = f"{row['system']}: {row['algorithm']}" + (f" ({row['scorer']})" if row.get("scorer") else "")
        table[label][int(row["budget"])][str(row["question_id"])] = (float(row["right"]),
                                                                      float(row["output_tokens"]))
    fits = []
    for label, by_budget in table.items():
        budgets = sorted(by_budget)
        questions = sorted(set.intersection(*(set(by_budget[b]) for b in budgets))) if budgets else []
        if len(budgets) < 3 or not questions:
            continue
        rates = [[by_budget[b][q][0] for b in budgets] for q in questions]
        tokens = [sum(by_budget[b][q][1] for q in questions) / len(questions) for b in budgets]
        for unit, spends in (("generations", [float(b) for b in budgets]), ("output tokens", tokens)):
            if len(set(spends)) < 3 or min(spends) <= 0:
                continue
            fitted = fit(spends, per_question=rates, bootstrap=bootstrap, seed=seed)
            accuracies = tuple(sum(r[i] for r in rates) / len(rates) for i in range(len(spends)))
            fits.append(CurveFit(label, unit, tuple(spends), accuracies, fitted,
                                 fitted.law.predict(2 * max(spends)),
                                 fitted.law.budget_for(target) if target is not None else None))
    if not fits:
        raise ConfigError(f"{results}: no curve with three or more budgets to fit")
    return fits


def save(run: Path, fits: list[CurveFit], cache: Path | None = None) -> Path:
    out = run / "fits.json"
    out.write_text(json.dumps([f.to_dict() for f in fits], indent=2) + "\n", encoding="utf-8")
    if cache is not None:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8")) \
            if (run / "summary.json").is_file() else {}
        store = FitCache(cache)
        for f in fits:
            store.put(str(summary.get("model", "?")), str(summary.get("dataset", "?")), f.algorithm, f.unit, f.fit)
    return out
