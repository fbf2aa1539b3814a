"""``apportion bench``: run the grid and write a run directory.

A run directory holds:

- ``bank.jsonl``: the sample bank (every raw sample: text, extracted answer, tokens, log-probs),
  when any cell is replayed; written as it is drawn, so ``--resume`` continues a cut-off draw;
- ``live.jsonl``: the journal of live cells (ours, and peers on the live server), one line per
  question as it finishes, so ``--resume`` skips what a cut-off run finished (``bench.journal``);
- ``samples.jsonl``: for live cells, every run's full result (candidates with their texts);
- ``results.jsonl``: one line per cell and question (right or not, answer, tokens, dollars);
- ``summary.json``: the configuration and one row per cell (the format ``report`` reads).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO

from apportion import __version__
from apportion.algorithms.prompting import spell_prompt_mode
from apportion.answers.equivalence import Equivalence
from apportion.banks import ESTIMATED_KEY, BankWriter, Problem, SampleBank
from apportion.bench.grid import (
    GridOptions,
    Progress,
    QuestionOutcome,
    Row,
    canonical,
    draw_bank,
    live_cell,
    replay_cells,
)
from apportion.bench.journal import JOURNAL_FILE, LiveJournal
from apportion.bench.oracle import OraclePoint, oracle_curve
from apportion.bench.peers import PeerRun, PeerSearch, peer, peer_rows
from apportion.bench.stats import anytime_index
from apportion.bench.stop_cells import stop_cell
from apportion.budget.units import Price
from apportion.errors import ConfigError
from apportion.lm.base import Backend
from apportion.lm.openai_http import OpenAIHTTPBackend
from apportion.lm.replay import ReplayBackend

SUMMARY_VERSION = 1


@dataclass
class BenchSpec:
    """What to run: the questions, the grid, and where they come from (for the summary)."""

    problems: list[Problem]
    options: GridOptions
    dataset: str
    out: Path
    bank: SampleBank | None = None
    """A bank given up front (``--bank``): nothing is sampled, every cell is replayed."""
    resume: bool = False
    journal_only: bool = False
    """Rows of what the journal holds, running nothing (implies ``resume``): a cell cut short is a
    row over the questions it answered, and says so; a cell never started is left out, and said."""
    peers: tuple[str, ...] = ()
    peer_endpoint: str | None = None
    """"replay" (the bank, identical samples) or "live" (the run's server); default: replay when
    there is a bank."""
    peer_orders: int = 5
    """Replay orders per peer cell (live peer cells run once)."""
    peer_algorithms: tuple[str, ...] | None = None
    """What the peers run (default: the grid's algorithms)."""
    price: Price | None = None
    """Prices for a given bank's tokens (default: the backend's, else free)."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchOutcome:
    summary: dict[str, Any]
    rows: list[Row]


class _Sinks:
    def __init__(self, out: Path) -> None:
        self.results: TextIO = (out / "results.jsonl").open("w", encoding="utf-8")
        self.samples: TextIO | None = None
        self._out = out

    def record(self, row: Row, outcomes: Sequence[QuestionOutcome]) -> None:
        for o in outcomes:
            line = {"system": row.system, "algorithm": row.algorithm, "scorer": row.scorer, "budget": row.budget,
                    "mode": row.mode, "question_id": o.problem.id, "level": o.problem.level,
                    "gold": o.problem.answer, "answer": o.answer, "right": o.right,
                    "input_tokens": o.input_tokens, "output_tokens": o.output_tokens, "usd": o.usd,
                    "error": o.error, "search": o.search}
            self.results.write(json.dumps(line, ensure_ascii=False) + "\n")
            if o.extra:
                if self.samples is None:
                    self.samples = (self._out / "samples.jsonl").open("w", encoding="utf-8")
                self.samples.write(json.dumps({"system": row.system, "algorithm": row.algorithm,
                                               "budget": row.budget, "question_id": o.problem.id, **o.extra},
                                              ensure_ascii=False) + "\n")
        self.results.flush()

    def close(self) -> None:
        self.results.close()
        if self.samples is not None:
            self.samples.close()


RUN_FILES = ("bank.jsonl", JOURNAL_FILE, "results.jsonl", "samples.jsonl", "summary.json")


def check_run_dir(out: Path, *, resume: bool) -> None:
    """A run directory is never truncated: one that holds a run is continued (``resume``) or
    refused, never started over."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; it must name a run directory (new, or one to --resume)")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not ((out / "bank.jsonl").is_file() or (out / JOURNAL_FILE).is_file()):
            raise ConfigError(f"--resume: {out} holds no sample bank and no journal of live cells to continue")
        return
    if held:
        raise ConfigError(f"{out} already holds a run ({', '.join(held)}); pass --resume to continue its "
                          "sample bank and live cells, or choose another --out (a run directory is never overwritten)")


async def run_bench(spec: BenchSpec, backend: Backend | None, *, progress: Progress | None = None) -> BenchOutcome:
    check_run_dir(spec.out, resume=spec.resume or spec.journal_only)
    options = spec.options
    replayed = [a for a in options.algorithms if options.replayed(a)]
    live = [a for a in options.algorithms if not options.replayed(a)]
    if spec.journal_only and ((replayed and spec.bank is None) or spec.peers):
        raise ConfigError("--journal-only writes the rows of journaled live cells and runs nothing: it goes with "
                          "--live (or a given --bank) and no --peer")
    if spec.bank is not None and live:
        raise ConfigError(f"a given bank can only be replayed; these need a model: {', '.join(live)} "
                          "(use a replayable scorer, or drop --bank)")
    if live and backend is None:
        raise ConfigError("live cells need a backend")
    if not spec.problems:
        raise ConfigError("no questions to run")
    if options.scorer == "bank" and any(canonical(a) != "self-consistency" for a in replayed) and not (
            spec.bank is not None and spec.bank.has_scores):
        raise ConfigError("scorer 'bank' needs a bank with its own scores (e.g. the math_cot file)")
    if options.stops and not replayed:
        raise ConfigError("--stop is replayed over a bank: give a sample-based algorithm that is replayed "
                          "(self-consistency, or best-of-n with self-certainty), not --live")
    if spec.peers:  # checked now: a bad peer setup must not surface after hours of sampling
        _peer_mode(spec, backend, has_bank=spec.bank is not None or bool(replayed))
    spec.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    eq = Equivalence()
    bank = spec.bank
    if replayed and bank is None:
        assert backend is not None
        bank = await _draw(spec, backend, progress)
    if bank is not None and options.bank_size > bank.k:
        raise ConfigError(f"budget {options.bank_size} exceeds the bank's {bank.k} samples per question")
    journal = None
    if live or (spec.peers and _peer_mode(spec, backend, has_bank=bank is not None) == "live"):
        # read (and checked) before anything of the earlier run is rewritten
        journal = LiveJournal(spec.out / JOURNAL_FILE, _journal_meta(spec, backend), spec.problems,
                              resume=spec.resume or spec.journal_only,
                              later_defaults={"sampling": _LATER_SAMPLING_DEFAULTS})
    sinks = _Sinks(spec.out)
    rows: list[Row] = []
    failures: list[str] = []
    skipped: list[str] = []
    oracle = oracle_curve(bank, eq) if bank is not None else []
    try:
        price = spec.price or (backend.price if backend is not None else Price())
        for algorithm in replayed:
            assert bank is not None
            for row, outcomes in await replay_cells(bank, algorithm, options.budgets, scorer=options.scorer,
                                                    orders=options.orders, seed=options.seed, price=price,
                                                    equivalence=eq, sampling=options.sampling):
                rows.append(row)
                sinks.record(row, outcomes)
            if progress is not None:
                progress("replay", replayed.index(algorithm) + 1, len(replayed))
            for rule in options.stops:
                if canonical(algorithm) != "self-consistency" and not (bank.has_logprobs or bank.has_scores):
                    skipped.append(f"{canonical(algorithm)} --stop {rule.describe()}: the bank has neither "
                                   "recorded scores nor the log-probabilities self-certainty needs")
                    continue
                row, outcomes = await stop_cell(bank, algorithm, rule, orders=options.orders, seed=options.seed,
                                                price=price, sampling=options.sampling, equivalence=eq)
                row = replace(row, notes=(*row.notes, _token_share(row, oracle)))
                rows.append(row)
                sinks.record(row, outcomes)
        for algorithm in live:
            assert backend is not None and journal is not None
            for budget in options.budgets:
                cell = ("apportion", canonical(algorithm), budget)
                done, problems = journal.done(cell), spec.problems
                if spec.journal_only:
                    problems = [p for p in spec.problems if p.id in done]
                    if not problems:
                        skipped.append(f"{canonical(algorithm)} @{budget}: no question journaled (--journal-only)")
                        continue
                row, outcomes = await live_cell(backend, problems, algorithm, budget, options,
                                                equivalence=eq, progress=progress, done=done,
                                                record=partial(journal.add, cell))
                if len(problems) < len(spec.problems):
                    row = replace(row, notes=(*row.notes, f"cut short: {len(problems)} of {len(spec.problems)} "
                                                          "questions (--journal-only)"))
                rows.append(row)
                sinks.record(row, outcomes)
        if spec.peers:
            peer_run = _peer_run(spec, backend, bank, price)
            algorithms = spec.peer_algorithms or options.algorithms
            for name in spec.peers:
                for row, outcomes in await peer_rows(name, algorithms, options.budgets, spec.problems,
                                                     peer_run, equivalence=eq, progress=progress,
                                                     journal=journal if peer_run.mode == "live" else None):
                    rows.append(row)
                    sinks.record(row, outcomes)
            failures = peer_run.failures
    finally:
        if journal is not None:
            journal.close()
        sinks.close()
        # written whatever happened to the peers: the cells already run are never lost
        summary = _summary(spec, backend, bank, rows, time.monotonic() - started)
        summary["oracle"] = {"rule": "pass@k", "points": [p.to_dict() for p in oracle]} if oracle else None
        summary["peer_failures"] = failures
        summary["skipped"] = skipped
        (spec.out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return BenchOutcome(summary, rows)


def _token_share(row: Row, oracle: Sequence[OraclePoint]) -> str:
    """The share of the full budget's output tokens a stop row used: uniform sampling at the row's
    budget spends ``oracle``'s tokens at that budget (the same samples, all of them)."""
    full = next((p.output_tokens for p in oracle if p.budget == row.budget), 0.0)
    if full <= 0:
        return "the bank has no token counts, so no share of the full budget's tokens"
    return (f"{100 * row.output_tokens / full:.1f}% of the full budget's output tokens "
            f"({row.output_tokens:.0f} of {full:.0f} per question)")


async def _draw(spec: BenchSpec, backend: Backend, progress: Progress | None) -> SampleBank:
    options = spec.options
    path = spec.out / "bank.jsonl"
    have: dict[str, Any] = {}
    if spec.resume and path.is_file():
        previous = SampleBank.load(path)
        _check_resumable(previous, backend, options, spec.dataset)
        have = {e.problem.id: e for e in previous.entries}
        for p in spec.problems:
            if p.id in have and have[p.id].problem != p:
                raise ConfigError(f"cannot resume: question {p.id} of the bank is not this dataset's question {p.id}")
    todo = [p for p in spec.problems if p.id not in have]
    total, done = len(spec.problems), len(spec.problems) - len(todo)
    meta = {"dataset": spec.dataset, "model": backend.model, "backend": backend.name, "k": options.bank_size,
            "seed": options.seed, "sampling": asdict(options.sampling), "concurrency": options.concurrency,
            "prompt_mode": spell_prompt_mode(options.sampling.prompt_mode), "created": _now()}
    if progress is not None:
        progress("sampling", done, total)

    def saved(entry: Any) -> None:
        nonlocal done
        writer.add(entry)
        done += 1
        if progress is not None:
            progress("sampling", done, total)

    # Seeds follow the question's position in the dataset, so a resumed draw samples as one
    # uninterrupted draw would have.
    index = {p.id: i for i, p in enumerate(spec.problems)}
    with BankWriter(path, meta, append=bool(have)) as writer:
        await draw_bank(backend, todo, options.bank_size, options.sampling,
                        seeds=[options.seed + index[p.id] for p in todo], concurrency=options.concurrency,
                        on_entry=saved)
    drawn = SampleBank.load(path)
    by_id = {e.problem.id: e for e in drawn.entries}
    bank = SampleBank([by_id[p.id] for p in spec.problems], drawn.meta)
    wanted = {p.id for p in spec.problems}
    others = [e for e in drawn.entries if e.problem.id not in wanted]  # drawn earlier with a larger --limit
    if [e.problem.id for e in drawn.entries] != [p.id for p in spec.problems] + [e.problem.id for e in others]:
        # entries land in completion order; the file keeps dataset order, as an uncut draw would
        partial = path.with_suffix(".tmp")
        SampleBank(bank.entries + others, drawn.meta).save(partial)
        partial.replace(path)
    return bank


# Sampling fields added after journals were first written: the journal leaves them out of its
# header at their default, so a journal written before them still resumes.
_LATER_SAMPLING_DEFAULTS = {"answers": "math"}


def _journal_meta(spec: BenchSpec, backend: Backend | None) -> dict[str, Any]:
    """What every live outcome depends on beside its cell and question (``bench.journal``)."""
    options = spec.options
    return {"dataset": spec.dataset, "model": backend.model if backend is not None else None, "seed": options.seed,
            "sampling": asdict(options.sampling), "scorer": options.scorer,
            "process_scorer": options.process_scorer_name, "search": options.search_dict(), "judge": options.judge}


def _peer_mode(spec: BenchSpec, backend: Backend | None, *, has_bank: bool) -> str:
    for name in spec.peers:
        peer(name)  # an unknown name is a usage error, before any peer runs
    mode = spec.peer_endpoint or ("replay" if has_bank else "live")
    if mode not in ("replay", "live"):
        raise ConfigError(f"peer endpoint must be 'replay' or 'live', got {mode!r}")
    if mode == "replay" and not has_bank:
        raise ConfigError("peers on a replay endpoint need a bank: replay a sample-based algorithm or give --bank")
    if mode == "live" and not isinstance(backend, OpenAIHTTPBackend):
        raise ConfigError("live peers need an OpenAI-compatible server (--base-url); the embedded model is not one")
    return mode


def _peer_run(spec: BenchSpec, backend: Backend | None, bank: SampleBank | None, price: Price) -> PeerRun:
    mode = _peer_mode(spec, backend, has_bank=bank is not None)
    options = spec.options
    search = PeerSearch(options.process_scorer, options.search) if options.process_scorer is not None else None
    if mode == "replay":
        assert bank is not None
        return PeerRun(lambda order: ReplayBackend(bank, seed=options.seed + order, price=price), "replay",
                       spec.peer_orders, options.sampling, options.seed, options.concurrency, judge=options.judge,
                       search=search)
    http = backend
    assert isinstance(http, OpenAIHTTPBackend)
    return PeerRun(lambda order: OpenAIHTTPBackend(http.options), "live", 1, options.sampling, options.seed,
                   options.concurrency, judge=options.judge, search=search)


def _check_resumable(previous: SampleBank, backend: Backend, options: GridOptions, dataset: str) -> None:
    meta = previous.meta
    wanted = {"dataset": dataset, "model": backend.model, "k": options.bank_size, "seed": options.seed,
              "sampling": asdict(options.sampling)}
    for key, value in wanted.items():
        value = json.loads(json.dumps(value))  # as the header stored it (tuples become lists)
        if key in meta and meta[key] != value:
            raise ConfigError(f"cannot resume: the bank was drawn with {key}={meta[key]!r}, this run has {value!r}")


def _summary(spec: BenchSpec, backend: Backend | None, bank: SampleBank | None, rows: list[Row],
             seconds: float) -> dict[str, Any]:
    options = spec.options
    meta = bank.meta if bank is not None else {}
    return {
        "version": SUMMARY_VERSION,
        "run": spec.out.name,
        "dataset": spec.dataset,
        "model": backend.model if backend is not None else meta.get("model", "bank"),
        "backend": backend.name if backend is not None else "replay",
        "created": _now(),
        "questions": len(spec.problems),
        "seconds": round(seconds, 3),
        "apportion": __version__,
        "config": {"algorithms": list(options.algorithms), "budgets": list(options.budgets),
                   "scorer": options.scorer, "process_scorer": options.process_scorer_name,
                   "search": options.search_dict(), "judge": options.judge,
                   "orders": options.orders, "seed": options.seed,
                   "live": options.live, "concurrency": options.concurrency,
                   "sampling": asdict(options.sampling), "bank_k": bank.k if bank is not None else None,
                   "peers": list(spec.peers), "peer_endpoint": spec.peer_endpoint, "peer_orders": spec.peer_orders,
                   "peer_algorithms": list(spec.peer_algorithms or options.algorithms),
                   "bank_seconds": round(sum(e.seconds for e in bank.entries), 3) if bank is not None else None,
                   **spec.extra},
        "tokens_estimated": tokens_estimated(bank),
        "rows": [r.to_dict() for r in rows],
        "anytime": anytime_series(rows),
    }


def tokens_estimated(bank: SampleBank | None) -> str | None:
    """How the bank's token counts were estimated, where they were (None: as the backend reported them)."""
    if bank is None:
        return None
    note = bank.meta.get(ESTIMATED_KEY)
    if isinstance(note, dict):
        prompts = ("prompt tokens as the bank stored them" if any(e.prompt_tokens for e in bank.entries)
                   else "prompt tokens unknown (counted as 0)")
        return (f"output tokens of {note.get('samples', '?')} samples counted with the {note.get('tokenizer', '?')} "
                f"tokenizer ({note.get('why', 'the bank stored none')}); {prompts}")
    guessed = sum(1 for e in bank.entries if e.estimated)
    if guessed:
        return (f"{guessed} of {len(bank.entries)} bank requests had no usage from the server: their tokens "
                "are estimated")
    return None


def anytime_series(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The Anytime Index of each curve of rows (one system, algorithm, scorer and mode over two
    budgets or more), per generation and per token: accuracy gained per unit of budget, averaged
    over the curve's budget increments (``stats.anytime_index``). A stop-rule row, at one budget,
    is no curve and gets none."""
    groups: dict[tuple[str, str, str | None, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.system, row.algorithm, row.scorer, row.mode), []).append(row)
    out = []
    for (system, algorithm, scorer, mode), members in groups.items():
        members = sorted(members, key=lambda r: r.budget)
        if len(members) < 2:
            continue
        out.append({"system": system, "algorithm": algorithm, "scorer": scorer, "mode": mode,
                    "budgets": [r.budget for r in members],
                    "per_generation": anytime_index([(r.budget, r.accuracy) for r in members]),
                    "per_token": anytime_index([(r.tokens, r.accuracy) for r in members])})
    return out


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
