"""What ``run`` and ``batch`` share to answer with several models: the models file and the
cascade's settings, checked, and the cascade built over the models' backends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from apportion.algorithms.base import Algorithm, SamplingOptions, check_budget_can_bind
from apportion.algorithms.registry import make_algorithm
from apportion.allocate.cascade import CONFIDENCES, Cascade, CascadeOptions, CascadePolicy
from apportion.allocate.engine import BatchResult, answer_batch
from apportion.allocate.models import ModelSpec, build_backends, load_models
from apportion.batch import Item, read_items
from apportion.budget.units import Budget
from apportion.cli._app import EXIT_FAILURE, EXIT_USAGE, checked_preflight, fail, make_scorer
from apportion.errors import ApportionError, ConfigError
from apportion.files import check_output
from apportion.lm.base import Backend
from apportion.reward.base import OutcomeScorer

DEFAULT_SAMPLES = 4
DEFAULT_THRESHOLD = 0.5

ModelsOpt = Annotated[Path | None, typer.Option(
    "--models", help="A JSON list of models, cheapest first: name, model_path (GGUF) or base_url + model, and "
                     "price 'IN,OUT' (USD per million tokens). Answers with a cascade over them.")]
CascadeSamplesOpt = Annotated[str | None, typer.Option(
    "--cascade-samples", help=f"Samples per model of the cascade, e.g. '4,4' (default {DEFAULT_SAMPLES} each).")]
ThresholdOpt = Annotated[str | None, typer.Option(
    "--threshold", help="Escalate past a model when its confidence is below this (one per model but the last; "
                        f"default {DEFAULT_THRESHOLD}). `apportion bench cascade` chooses them from banks.")]
ConfidenceOpt = Annotated[str, typer.Option(
    "--confidence", help=f"A model's confidence: {', '.join(CONFIDENCES)} (vote share, or times token probability).")]


@dataclass(frozen=True, slots=True)
class CascadeSettings:
    """A checked cascade over the models of a models file, cheapest first."""

    models: tuple[ModelSpec, ...]
    samples: tuple[int, ...]
    thresholds: tuple[float, ...]
    confidence: str = "vote"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    def options(self, sampling: SamplingOptions) -> CascadeOptions:
        return CascadeOptions(sampling, self.samples, self.thresholds, self.confidence)


def cascade_settings(models: Path, samples: str | None, thresholds: str | None,
                     confidence: str) -> CascadeSettings:
    specs = load_models(models)
    if len(specs) < 2:
        raise ConfigError(f"{models}: a cascade needs two or more models, cheapest first")
    counts = _numbers(samples, "--cascade-samples", int) if samples else [DEFAULT_SAMPLES] * len(specs)
    limits = _numbers(thresholds, "--threshold", float) if thresholds else [DEFAULT_THRESHOLD] * (len(specs) - 1)
    if len(counts) != len(specs):
        raise ConfigError(f"--cascade-samples gives {len(counts)} count(s) for {len(specs)} models")
    if len(limits) != len(specs) - 1:
        raise ConfigError(f"--threshold gives {len(limits)} value(s); {len(specs)} models need {len(specs) - 1}")
    settings = CascadeSettings(specs, tuple(int(c) for c in counts), tuple(float(t) for t in limits), confidence)
    settings.options(SamplingOptions())  # checks counts, thresholds and confidence before any model is loaded
    return settings


def _numbers(text: str, option: str, kind: type[int] | type[float]) -> list[float]:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} must be comma-separated numbers, got {text!r}") from None


def cascade_backends(settings: CascadeSettings, budget: Budget, timeout: str | None) -> dict[str, Backend]:
    """The models' backends (embedded ones loaded), each checked to be priced where dollars bind."""
    backends = build_backends(settings.models, timeout)
    for backend in backends.values():
        check_budget_can_bind(budget, backend)
    return backends


def cascade_algorithm(settings: CascadeSettings, backends: dict[str, Backend],
                      sampling: SamplingOptions) -> tuple[Backend, Cascade]:
    """The first model's backend and the cascade that starts there."""
    first, *later = (backends[n] for n in settings.names)
    return first, Cascade(later, settings.options(sampling))


async def run_cascade_batch(settings: CascadeSettings, backends: dict[str, Backend], items: Sequence[Item],
                            total: Budget, sampling: SamplingOptions, scorer: OutcomeScorer, *,
                            concurrency: int, seed: int | None) -> BatchResult:
    """A file under one total budget: every prompt starts on the first model, and the least
    confident are escalated first, as far as the total goes (``CascadePolicy``)."""
    policy = CascadePolicy(settings.names, settings.samples, settings.thresholds, settings.confidence,
                           window=concurrency)

    def make(name: str) -> Algorithm:
        return Cascade(options=CascadeOptions(sampling)) if name == "cascade" else \
            make_algorithm(name, sampling, scorer)

    try:
        return await answer_batch(items, backends[settings.names[0]], total, policy, make, algorithm="cascade",
                                  max_tokens=sampling.max_tokens, system_prompt=sampling.system_prompt,
                                  concurrency=concurrency, seed=seed, backends=backends)
    finally:
        for backend in backends.values():
            await backend.aclose()


@dataclass(frozen=True, slots=True)
class CascadeBatch:
    """A file of prompts under one total budget, answered by a cascade (checked)."""

    settings: CascadeSettings
    items: list[Item]
    total: Budget
    out: Path
    concurrency: int
    seed: int | None


def checked_cascade_batch(settings: CascadeSettings, file: Path, out: Path | None, total_budget: str,
                          field: str | None, concurrency: int, seed: int | None) -> CascadeBatch:
    if out is None:
        raise ConfigError("a batch needs --out, the JSONL file to write answers to")
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    total = Budget.parse(total_budget)
    check_output(out, inputs=(file,))
    return CascadeBatch(settings, read_items(file, field), total, out, concurrency, seed)


def run_cascade_batch_command(job: CascadeBatch, sampling: SamplingOptions, scorer: OutcomeScorer,
                              timeout: str | None, report: Path | None, json_out: bool, trace: bool,
                              console: Console) -> None:
    """Load the models, answer the file, write the rows and the allocation report."""
    from apportion.cli.batch import write_batch  # the batch command imports this module

    try:
        backends = cascade_backends(job.settings, job.total, timeout)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    for backend in backends.values():
        checked_preflight(backend, console)
    try:
        result = asyncio.run(run_cascade_batch(job.settings, backends, job.items, job.total, sampling, scorer,
                                               concurrency=job.concurrency, seed=job.seed))
    except ApportionError as exc:
        fail(console, exc, EXIT_FAILURE)
    code = write_batch(result, job.out, report or job.out.with_name(job.out.name + ".allocation.json"), json_out,
                       trace, console)
    if code:
        raise typer.Exit(code)


def cascade_batch_command(file: Path, out: Path | None, total_budget: str, policy: str, models: Path | None,
                          samples: str | None, thresholds: str | None, confidence: str, sampling: SamplingOptions,
                          scorer: str, field: str | None, concurrency: int, seed: int | None,
                          timeout: str | None, report: Path | None, json_out: bool, trace: bool, console: Console,
                          unused: dict[str, object]) -> None:
    """``apportion batch FILE --models M --policy cascade``: checked, then run."""
    try:
        if policy != "cascade" or models is None:
            raise ConfigError("--models goes with --policy cascade, and --policy cascade needs --models")
        given = [name for name, value in unused.items() if value not in (None, False, "local")]
        if given:
            raise ConfigError(f"a cascade over --models does not take {', '.join(given)}")
        job = checked_cascade_batch(cascade_settings(models, samples, thresholds, confidence), file, out,
                                    total_budget, field, concurrency, seed)
        chosen = make_scorer(scorer)
    except ApportionError as exc:
        fail(console, exc, EXIT_USAGE)
    run_cascade_batch_command(job, sampling, chosen, timeout, report, json_out, trace, console)
