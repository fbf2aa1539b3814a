"""Sample banks: K samples per question, drawn once, replayed by many algorithms and budgets.

A bank file is JSONL: a header line ``{"bank": 1, ...metadata}`` then one line per question with
its problem, prompt tokens and samples (text, extracted answer, tokens, log-probabilities,
optional external score). ``from_math_cot`` reads the real bank shipped in the shared data
(eight solutions per MATH problem from a math model, with reward-model scores).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apportion.answers.extract import read_answer
from apportion.answers.normalize import normalize_answer
from apportion.banks.problem import Problem
from apportion.errors import ConfigError
from apportion.files import jsonl_lines
from apportion.lm.base import Sample
from apportion.result import Candidate

BANK_VERSION = 1


@dataclass(frozen=True, slots=True)
class BankSample:
    text: str
    answer: str | None
    output_tokens: int
    logprobs: tuple[float, ...] | None = None
    score: float | None = None
    """An external score (a reward model's), where the bank has one."""
    raw_answer: str | None = None
    finish_reason: str = "stop"

    method: str | None = None
    confidences: tuple[float, ...] | None = None
    """Per-token top-k confidences (``Sample.confidences``), where the draw asked for them."""

    @classmethod
    def from_sample(cls, sample: Sample) -> BankSample:
        answer, raw, method = read_answer(sample.text)
        confidences = None if sample.confidences is None else tuple(round(c, 4) for c in sample.confidences)
        return cls(sample.text, answer, sample.output_tokens, sample.logprobs, None, raw,
                   sample.finish_reason, method, confidences)

    @property
    def mean_logprob(self) -> float | None:
        if not self.logprobs:
            return None
        return math.fsum(self.logprobs) / len(self.logprobs)

    def candidate(self) -> Candidate:
        """The candidate a live run would have built from this sample (score included)."""
        return Candidate(self.text, self.answer, self.raw_answer, self.method,
                         self.finish_reason, self.output_tokens, self.mean_logprob, score=self.score,
                         logprobs=self.logprobs, confidences=self.confidences)


@dataclass(frozen=True, slots=True)
class BankEntry:
    problem: Problem
    samples: tuple[BankSample, ...]
    prompt_tokens: int = 0
    prompt: dict[str, Any] | None = None
    """The prompt the samples answered (chat messages or text), for replay over HTTP."""
    seconds: float = 0.0
    """Wall time of the request that drew the samples (0 when unknown)."""
    estimated: bool = False
    """The token counts were estimated (the server reported no usage)."""


@dataclass
class SampleBank:
    entries: list[BankEntry]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_scores(self) -> bool:
        """Some sample carries an external score (a reward model's)."""
        return any(s.score is not None for e in self.entries for s in e.samples)

    @property
    def has_logprobs(self) -> bool:
        return any(s.logprobs for e in self.entries for s in e.samples)

    @property
    def has_confidences(self) -> bool:
        return any(s.confidences for e in self.entries for s in e.samples)

    @property
    def k(self) -> int:
        """Samples every question has (the largest budget replay can serve)."""
        return min((len(e.samples) for e in self.entries), default=0)

    def save(self, path: str | Path) -> None:
        with BankWriter(path, self.meta) as writer:
            for entry in self.entries:
                writer.add(entry)

    @classmethod
    def load(cls, path: str | Path) -> SampleBank:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read bank {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {exc.start + 1}), so not a sample bank") from None
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a draw cut off mid-line: that entry was never finished
        lines = text.splitlines()
        if not lines:
            raise ConfigError(f"{path} is empty")
        header = _json_line(lines[0], path, 1)
        if not isinstance(header, dict) or header.get("bank") != BANK_VERSION:
            raise ConfigError(f"{path} is not a sample bank (version {BANK_VERSION} header missing)")
        meta = {k: v for k, v in header.items() if k != "bank"}
        entries = [_entry_from(_json_line(line, path, n), path, n) for n, line in enumerate(lines[1:], 2)
                   if line.strip()]
        return cls(entries, meta)


class BankWriter:
    """Writes a bank as its entries arrive, one flushed line each, so a long draw that is cut off
    keeps what it drew (``open_bank`` reads a partial file; ``bench --resume`` continues it)."""

    def __init__(self, path: str | Path, meta: dict[str, Any], *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not (append and self.path.is_file() and self.path.stat().st_size)
        if not fresh:
            _drop_unfinished_line(self.path)
        self._out = self.path.open("w" if fresh else "a", encoding="utf-8")
        if fresh:
            self._out.write(json.dumps({"bank": BANK_VERSION, **meta}) + "\n")
            self._out.flush()

    def add(self, entry: BankEntry) -> None:
        self._out.write(json.dumps(_entry_dict(entry), ensure_ascii=False) + "\n")
        self._out.flush()

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def _drop_unfinished_line(path: Path) -> None:
    """Cut a partial last line (a draw killed mid-write) so appended entries start on their own line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def open_bank(path: str | Path) -> SampleBank:
    """A bank file of either kind: ours (with the version header) or the shared math_cot file."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            first = handle.readline()
    except OSError as exc:
        raise ConfigError(f"cannot read bank {path}: {exc.strerror or exc}") from None
    try:
        head = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path}:1: not JSON, so not a sample bank") from None
    if isinstance(head, dict) and "bank" in head:
        return SampleBank.load(path)
    if isinstance(head, dict) and {"code", "pred", "gt"} <= head.keys():
        return from_math_cot(path)
    raise ConfigError(f"{path} is neither an apportion bank nor a math_cot sample file")


def from_math_cot(path: str | Path) -> SampleBank:
    """The shared bank of real samples: ``code`` (solution texts), ``pred`` (the source's extracted
    answers), ``pred_score`` (reward-model logits, last step taken), ``gt`` (gold), ``level``.

    Reward logits go through the logistic function: scores in [0, 1], as every scorer gives, so
    that weighted voting can sum them (a negative logit would otherwise count against its
    answer); the order, hence plain best-of-N, is unchanged."""
    entries = []
    for line in jsonl_lines(path):
        number, raw = line.number, line.value
        if line.error is not None:
            raise ConfigError(f"{path}: {line.error}")
        try:
            texts, preds, scores = raw["code"], raw["pred"], raw["pred_score"]
            if not (len(texts) == len(preds) == len(scores)):
                raise ConfigError(f"{path}:{number}: code, pred and pred_score differ in length")
            samples = tuple(
                BankSample(text, normalize_answer(pred) if pred else None, 0, None,
                           _logistic(float(score[-1])) if score else None, pred or None, "stop",
                           "source" if pred else None)
                for text, pred, score in zip(texts, preds, scores))
            level = str(raw.get("level", "")).replace("Level", "").strip() or None
            problem = Problem(str(raw.get("idx", number)), raw["question"], str(raw["gt"]), level)
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}:{number}: not a math_cot record ({type(exc).__name__}: {exc})") from None
        entries.append(BankEntry(problem, samples))
    return SampleBank(entries, {"source": "Qwen2.5-Math eval_rm_maj_example math_cot_100",
                                "scores": "reward model (pred_score, last step, logistic)"})


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _entry_dict(entry: BankEntry) -> dict[str, Any]:
    return {"problem": asdict(entry.problem), "prompt_tokens": entry.prompt_tokens, "prompt": entry.prompt,
            "seconds": round(entry.seconds, 4), "estimated": entry.estimated,
            "samples": [{k: v for k, v in asdict(s).items() if v is not None} for s in entry.samples]}


def _entry_from(raw: dict[str, Any], path: Path, line: int) -> BankEntry:
    try:
        samples = tuple(
            BankSample(s["text"], s.get("answer"), int(s.get("output_tokens", 0)),
                       tuple(s["logprobs"]) if s.get("logprobs") else None, s.get("score"),
                       s.get("raw_answer"), s.get("finish_reason", "stop"), s.get("method"),
                       tuple(s["confidences"]) if s.get("confidences") else None)
            for s in raw["samples"])
        return BankEntry(Problem(**raw["problem"]), samples, int(raw.get("prompt_tokens", 0)), raw.get("prompt"),
                         float(raw.get("seconds", 0.0)), bool(raw.get("estimated", False)))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}:{line}: not a bank entry ({exc})") from None


def bank_from_samples(problems: Iterable[Problem], samples: Iterable[Iterable[Sample]],
                      prompt_tokens: Iterable[int], prompts: Iterable[dict[str, Any]],
                      meta: dict[str, Any]) -> SampleBank:
    entries = [BankEntry(p, tuple(BankSample.from_sample(s) for s in ss), t, pr)
               for p, ss, t, pr in zip(problems, samples, prompt_tokens, prompts)]
    return SampleBank(entries, meta)
