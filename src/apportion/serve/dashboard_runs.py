"""The dashboard's benchmark runs: ``RunPlots`` reads each run's ``summary.json`` and draws its
accuracy-versus-spend plot with the report's own plotting, for ``/dashboard/api/runs`` and
``/dashboard/runs/{index}/plot.png``."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from apportion.errors import ConfigError

if TYPE_CHECKING:
    from apportion.bench.report import Curve, Summary


@dataclass(frozen=True, slots=True)
class _Run:
    stamp: tuple[int, int]
    """(mtime in ns, size) of the summary it was read from: a run rewritten since is read again."""
    summary: Summary
    curves: list[Curve]
    plot: bytes | None = None


class RunPlots:
    """Benchmark runs read with the report's own loading (``bench.report.load_summary``, ``build_curves``)
    and drawn with its plots: accuracy against mean tokens per question, or against generations where
    the rows have no token counts. Each is read at start-up (a bad directory is a ``ConfigError`` then),
    and again when its ``summary.json`` changes (a run still being written); a run that became
    unreadable shows its error instead of its curves."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = tuple(_summary_path(Path(p)) for p in paths)
        self._runs: dict[int, _Run] = {}
        # held in worker threads around reading and drawing: two requests must not draw one plot
        # twice, and matplotlib's rc_context changes process-wide settings while it draws
        self._lock = threading.Lock()
        for index in range(len(self._paths)):
            self._read(index)

    def __len__(self) -> int:
        return len(self._paths)

    async def describe(self) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self._describe)

    async def plot(self, index: int) -> bytes:
        """The run's plot as PNG; ``IndexError`` for no such run, ``ConfigError`` for one unreadable now."""
        return await anyio.to_thread.run_sync(self._plot, index)

    def _describe(self) -> list[dict[str, Any]]:
        out = []
        for index, path in enumerate(self._paths):
            entry: dict[str, Any] = {"index": index, "path": str(path.parent if path.name == "summary.json" else path)}
            try:
                with self._lock:
                    run = self._read(index)
            except (ConfigError, OSError) as exc:
                out.append({**entry, "error": str(exc), "curves": [], "plot": None})
                continue
            s = run.summary
            tokens = _has_tokens(s)
            out.append({**entry, "run": s.run, "dataset": s.dataset, "model": s.model, "backend": s.backend,
                        "questions": s.questions, "created": s.created, "error": None,
                        "x_axis": "tokens" if tokens else "generations",
                        "plot": f"dashboard/runs/{index}/plot.png?v={run.stamp[0]}-{run.stamp[1]}",
                        "curves": [_curve(c) for c in run.curves]})
        return out

    def _plot(self, index: int) -> bytes:
        if not 0 <= index < len(self._paths):
            raise IndexError(index)
        with self._lock:
            run = self._read(index)
            if run.plot is None:
                run = _Run(run.stamp, run.summary, run.curves, _draw(run.summary, run.curves))
                self._runs[index] = run
            assert run.plot is not None
            return run.plot

    def _read(self, index: int) -> _Run:
        """The run, read again if its summary changed (the caller holds the lock, or is the constructor)."""
        from apportion.bench.report import build_curves, load_summary  # matplotlib: only for servers with runs

        path = self._paths[index]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ConfigError(f"no summary.json at {path}: give a directory `apportion bench` wrote") from None
        except OSError as exc:
            raise ConfigError(f"benchmark run {path}: {exc.strerror or exc}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._runs.get(index)
        if cached is not None and cached.stamp == stamp:
            return cached
        summary = load_summary(path)
        run = self._runs[index] = _Run(stamp, summary, build_curves(summary.rows))
        return run


def _summary_path(path: Path) -> Path:
    return path / "summary.json" if path.is_dir() else path


def _has_tokens(summary: Summary) -> bool:
    return any(r.tokens is not None and r.tokens > 0 for r in summary.rows)


def _curve(curve: Curve) -> dict[str, Any]:
    return {"label": curve.label, "color": curve.color, "peer": curve.peer,
            "points": [{"budget": r.budget, "accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high,
                        "generations": r.mean_generations, "tokens": r.tokens, "usd": r.usd} for r in curve.rows]}


def _draw(summary: Summary, curves: list[Curve]) -> bytes:
    import matplotlib

    from apportion.bench.report import STYLE, plot_accuracy_vs_budget, plot_accuracy_vs_tokens

    draw = plot_accuracy_vs_tokens if _has_tokens(summary) else plot_accuracy_vs_budget
    # the report's plots write files; a private directory keeps concurrent servers apart
    with tempfile.TemporaryDirectory(prefix="apportion-dashboard-") as tmp, matplotlib.rc_context(STYLE):
        return draw(summary, curves, Path(tmp) / "plot.png").read_bytes()
