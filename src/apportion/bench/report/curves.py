"""Curves: the rows of one (system, algorithm, scorer) over budgets, each with the colour and marker that
every plot and the page use, and the short labels of single points."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import matplotlib
from matplotlib.colors import to_hex

from apportion.bench.report.summary import Row
from apportion.bench.stats import anytime_index

HOME_SYSTEM = "apportion"

# Short names for the frontier labels; an algorithm not listed keeps its full name.
ABBREVIATIONS = {"self-consistency": "SC", "best-of-n": "BoN", "weighted-best-of-n": "WBoN"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">")


@dataclass(frozen=True, slots=True)
class Curve:
    """Rows of one (system, algorithm, scorer), sorted by budget, with the colour and marker every plot uses."""

    label: str
    rows: tuple[Row, ...]
    color: str
    marker: str
    peer: bool


def build_curves(rows: Iterable[Row]) -> list[Curve]:
    """Group rows into curves, in order of first appearance, each with a fixed colour and marker.

    A group holding the same budget twice (a live and a replay run of one algorithm) would zigzag
    as one line, so it is split by mode.
    """
    groups: dict[tuple[str, str, str | None], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.system, row.algorithm, row.scorer), []).append(row)
    keyed: list[tuple[str, list[Row]]] = []
    for (system, algorithm, scorer), members in groups.items():
        base = _curve_label(system, algorithm, scorer)
        budgets = [r.budget for r in members]
        if len(set(budgets)) == len(budgets):
            keyed.append((base, members))
            continue
        by_mode: dict[str, list[Row]] = {}
        for r in members:
            by_mode.setdefault(r.mode, []).append(r)
        keyed.extend((f"{base} ({mode or 'no mode'})", rs) for mode, rs in by_mode.items())
    palette = [to_hex(c) for c in matplotlib.color_sequences["tab10"]]
    return [
        Curve(label=label, rows=tuple(sorted(members, key=lambda r: r.budget)),
              color=palette[i % len(palette)], marker=MARKERS[i % len(MARKERS)],
              peer=members[0].system != HOME_SYSTEM)
        for i, (label, members) in enumerate(keyed)
    ]


def _curve_label(system: str, algorithm: str, scorer: str | None) -> str:
    return f"{system}: {algorithm}" + (f" ({scorer})" if scorer else "")


def point_label(row: Row) -> str:
    """A short name for one point, e.g. ``SC@8``, ``BoN(judge)@4``, ``its_hub SC@16`` for a peer."""
    name = ABBREVIATIONS.get(row.algorithm, row.algorithm)
    if row.scorer:
        name += f"({row.scorer})"
    prefix = "" if row.system == HOME_SYSTEM else f"{row.system} "
    return f"{prefix}{name}@{row.budget}"


def curve_anytime(curve: Curve) -> tuple[float | None, float | None]:
    """The curve's Anytime Index (``stats.anytime_index``) per generation and per token; None where
    the curve has one point, or (per token) rows without token counts."""
    per_generation = anytime_index([(r.budget, r.accuracy) for r in curve.rows])
    placed = [(r.tokens, r.accuracy) for r in curve.rows if r.tokens is not None]
    per_token = anytime_index(placed) if len(placed) == len(curve.rows) else None
    return per_generation, per_token
