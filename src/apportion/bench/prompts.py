"""Prompt modes side by side: the plain prompt, TALE and Chain of Draft on the same questions.

Every mode answers every question live with self-consistency at the same generation budget and
seeds (question i gets seed + i in every mode), so the modes differ only in wording. Reported per
mode: accuracy with its Wilson 95% interval, mean output and input tokens per question, and,
against the plain prompt, the share of output tokens saved, the accuracy change, and the paired
counts behind it (questions only the mode gets right, only the plain prompt gets right).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.prompting import parse_prompt_mode
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.answers.equivalence import Equivalence
from apportion.bench.datasets import Problem
from apportion.bench.stats import wilson
from apportion.budget.units import Budget
from apportion.errors import ApportionError, ConfigError
from apportion.lm.base import Backend

DEFAULT_MODES = ("plain", "tale", "cod")


@dataclass(frozen=True, slots=True)
class PromptBenchConfig:
    modes: tuple[str, ...] = DEFAULT_MODES
    """Prompt modes as ``--prompt-mode`` spells them; the first is the baseline when "plain" is absent."""
    samples: int = 1
    """Generations per question (self-consistency's budget)."""
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(max_tokens=256))
    seed: int = 0
    concurrency: int = 1

    def __post_init__(self) -> None:
        if not self.modes:
            raise ConfigError("give at least one prompt mode")
        for mode in self.modes:
            parse_prompt_mode(mode)
        if len(set(self.modes)) < len(self.modes):
            raise ConfigError(f"a prompt mode is given twice: {', '.join(self.modes)}")
        if self.samples < 1 or self.concurrency < 1:
            raise ConfigError("samples >= 1 and concurrency >= 1 are required")


@dataclass(frozen=True, slots=True)
class _Answer:
    right: bool
    answer: str | None
    input_tokens: int
    output_tokens: int
    error: str | None


async def run_prompt_bench(backend: Backend, problems: Sequence[Problem], config: PromptBenchConfig,
                           progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    per_mode: dict[str, list[_Answer]] = {}
    walls: dict[str, float] = {}
    for mode in config.modes:
        started = time.monotonic()
        per_mode[mode] = await _answer_all(backend, problems, config, mode, progress)
        walls[mode] = time.monotonic() - started
    baseline = "plain" if "plain" in per_mode else config.modes[0]
    rows = [_row(mode, answers, per_mode[baseline], walls[mode], mode == baseline)
            for mode, answers in per_mode.items()]
    questions = [{"id": p.id, "gold": p.answer,
                  **{mode: {"answer": a[i].answer, "right": a[i].right, "output_tokens": a[i].output_tokens,
                            "error": a[i].error} for mode, a in per_mode.items()}}
                 for i, p in enumerate(problems)]
    return {"model": backend.model, "backend": backend.name, "questions": len(problems), "baseline": baseline,
            "config": {**asdict(config), "modes": list(config.modes)}, "rows": rows, "per_question": questions}


async def _answer_all(backend: Backend, problems: Sequence[Problem], config: PromptBenchConfig, mode: str,
                      progress: Callable[[str, int, int], None] | None) -> list[_Answer]:
    eq = Equivalence()
    limit = asyncio.Semaphore(config.concurrency)
    algorithm = SelfConsistency(SelfConsistencyOptions(replace(config.sampling, prompt_mode=parse_prompt_mode(mode))))
    done = 0

    async def one(index: int, problem: Problem) -> _Answer:
        nonlocal done
        async with limit:
            try:
                result = await algorithm.run(backend, problem.question, Budget(generations=config.samples),
                                             seed=config.seed + index)
            except ApportionError as exc:  # counted wrong, with what the attempts spent
                spent = getattr(getattr(exc, "result", None), "spent", None)
                answer = _Answer(False, None, getattr(spent, "input_tokens", 0), getattr(spent, "output_tokens", 0),
                                 str(exc))
            else:
                right = result.answer is not None and eq.same(result.answer, problem.answer)
                s = result.spent
                answer = _Answer(right, result.answer, s.input_tokens, s.output_tokens, result.error)
        done += 1
        if progress is not None:
            progress(mode, done, len(problems))
        return answer

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(problems))))


def _row(mode: str, answers: list[_Answer], base: list[_Answer], wall: float, is_base: bool) -> dict[str, Any]:
    n = len(answers)
    right = sum(a.right for a in answers)
    low, high = wilson(right, n)
    out = statistics.fmean(a.output_tokens for a in answers)
    base_out = statistics.fmean(a.output_tokens for a in base)
    base_right = sum(a.right for a in base)
    return {
        "mode": mode,
        "accuracy": right / n, "ci_low": low, "ci_high": high,
        "mean_output_tokens": out,
        "mean_input_tokens": statistics.fmean(a.input_tokens for a in answers),
        "tokens_saved": None if is_base or base_out == 0 else 1 - out / base_out,
        "accuracy_change": None if is_base else (right - base_right) / n,
        "only_this_right": None if is_base else sum(a.right and not b.right for a, b in zip(answers, base)),
        "only_baseline_right": None if is_base else sum(b.right and not a.right for a, b in zip(answers, base)),
        "errors": sum(a.error is not None for a in answers),
        "wall_seconds": wall,
    }


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['questions']} questions, {report['model']} ({report['backend']}); "
             f"against the {report['baseline']} prompt",
             f"{'mode':<28} {'accuracy [95% CI]':>24} {'out tok':>8} {'in tok':>8} {'saved':>7} {'change':>8} "
             f"{'+/-':>7}"]
    for r in report["rows"]:
        saved = "-" if r["tokens_saved"] is None else f"{100 * r['tokens_saved']:.0f}%"
        change = "-" if r["accuracy_change"] is None else f"{100 * r['accuracy_change']:+.1f}"
        paired = "-" if r["only_this_right"] is None else f"{r['only_this_right']}/{r['only_baseline_right']}"
        lines.append(f"{r['mode']:<28} {100 * r['accuracy']:>6.1f}% [{100 * r['ci_low']:5.1f}, "
                     f"{100 * r['ci_high']:5.1f}] {r['mean_output_tokens']:>8.1f} {r['mean_input_tokens']:>8.1f} "
                     f"{saved:>7} {change:>8} {paired:>7}")
    lines.append("saved: output tokens saved against the baseline; change: accuracy points; "
                 "+/-: questions only this mode / only the baseline got right")
    return "\n".join(lines)
