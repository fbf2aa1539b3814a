"""``apportion bench faults``: the real command line against a misbehaving server, counted.

A ``FaultServer`` on 127.0.0.1 answers with a mix of faults (fewer and more choices than asked,
missing usage, hangs, truncated and garbage bodies, errors); ``apportion run --file`` answers a
set of questions against it in a child process, exactly as a user runs it. The figures: questions
answered, answered partially, failed cleanly (with their spend in the row), lost (no row: must be
0), budget violations by the engine (spend past a limit, the server's own overrun set aside:
must be 0), what was charged against what the server generated (never less), and the requests
sent against the fewest that would do (one per question, where ``n`` is honoured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apportion.bench.faults.server import FAULTS, FaultServer
from apportion.budget.units import Budget
from apportion.errors import ConfigError

DEFAULT_SHARES = {
    "ok": 0.50, "one": 0.05, "short": 0.05, "extra": 0.05, "long": 0.03, "lying": 0.02, "nousage": 0.05,
    "nochoices": 0.03, "empty": 0.02, "garbage": 0.02, "truncate": 0.03, "drip": 0.02, "hang": 0.02,
    "reset": 0.02, "500": 0.03, "503": 0.02, "429": 0.04,
}


@dataclass(frozen=True, slots=True)
class FaultRunConfig:
    questions: int = 200
    budget: str = "gen=8,tokens=6000"
    concurrency: int = 8
    timeout_s: float = 2.0
    max_tokens: int = 64
    seed: int = 0
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))

    def __post_init__(self) -> None:
        if self.questions < 1 or self.concurrency < 1 or self.timeout_s <= 0 or self.max_tokens < 1:
            raise ConfigError("questions, concurrency and max_tokens must be >= 1 and the timeout > 0")
        unknown = set(self.shares) - set(FAULTS)
        if unknown:
            raise ConfigError(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
        Budget.parse(self.budget)


def parse_shares(text: str) -> dict[str, float]:
    """``"ok=0.6,hang=0.1,short=0.3"``; faults not named get no share."""
    shares: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            shares[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or shares.get(name.strip(), -1) < 0:
            raise ConfigError(f"--shares wants fault=weight pairs (weights >= 0), got {part!r}")
    if not shares or sum(shares.values()) <= 0:
        raise ConfigError(f"--shares needs a weight above 0, got {text!r}")
    return shares


def run(config: FaultRunConfig, workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        where = workdir or Path(scratch)
        where.mkdir(parents=True, exist_ok=True)
        questions, answers = where / "questions.jsonl", where / "answers.jsonl"
        questions.write_text("".join(
            json.dumps({"id": f"q{i}", "question": f"Sam has {i} apples and finds {i + 2} more. How many apples?"})
            + "\n" for i in range(config.questions)), encoding="utf-8")
        with FaultServer(config.shares, seed=config.seed) as server:
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "apportion", "run", "--file", str(questions), "--out", str(answers),
                 "--base-url", server.base_url, "--model", server.model, "--budget", config.budget,
                 "--concurrency", str(config.concurrency), "--timeout", str(config.timeout_s),
                 "--max-tokens", str(config.max_tokens), "--seed", str(config.seed)],
                capture_output=True, text=True, timeout=3600)
            wall = time.monotonic() - started
            billing = server.billing.to_dict()
        rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()] \
            if answers.is_file() else []
    return _report(config, rows, billing, proc, wall)


def _report(config: FaultRunConfig, rows: list[dict[str, Any]], billing: dict[str, Any],
            proc: subprocess.CompletedProcess[str], wall: float) -> dict[str, Any]:
    budget = Budget.parse(config.budget)
    status = Counter(r.get("status", "?") for r in rows)
    seen = {r.get("id") for r in rows}
    violations = [f"{r.get('id')}: {v}" for r in rows for v in _violations(r, budget)]
    spent = [r["spent"] for r in rows if isinstance(r.get("spent"), dict)]
    charged_in = sum(s["input_tokens"] for s in spent)
    charged_out = sum(s["output_tokens"] for s in spent)
    overrun_out = sum(s["server_overrun"]["output_tokens"] for s in spent)
    failed = [r for r in rows if r.get("status") == "failed"]
    return {
        "config": asdict(config),
        "exit_code": proc.returncode,
        "traceback": "Traceback" in proc.stderr,
        "wall_seconds": round(wall, 2),
        "questions": config.questions,
        "answered": status["answered"],
        "partial": sum(1 for r in rows if r.get("partial")),
        "unanswered": status["unanswered"],
        "nothing_drawn": status["nothing drawn"],
        "failed_cleanly_with_spend": sum(1 for r in failed if isinstance(r.get("spent"), dict) and r.get("error")),
        "failed_without_spend": sum(1 for r in failed if not isinstance(r.get("spent"), dict)),
        "lost": sum(1 for i in range(config.questions) if f"q{i}" not in seen),
        "budget_violations": len(violations),
        "violations": violations[:20],
        "requests": billing["requests"],
        "minimum_requests": config.questions,
        "requests_per_minimum": round(billing["requests"] / config.questions, 3),
        "charged_input_tokens": charged_in,
        "charged_output_tokens": charged_out,
        "billed_input_tokens": billing["prompt_tokens"],
        "billed_output_tokens": billing["completion_tokens"],
        "undercharged": charged_in < billing["prompt_tokens"] or charged_out < billing["completion_tokens"],
        "server_overrun_output_tokens": overrun_out,
        "estimated_rows": sum(1 for s in spent if s["estimated"]),
        "faults": billing["faults"],
        "stderr_tail": proc.stderr[-1500:],
    }


def _violations(row: dict[str, Any], budget: Budget) -> list[str]:
    s = row.get("spent")
    if not isinstance(s, dict):
        return []
    o = s["server_overrun"]
    own = {"generations": s["generations"], "input_tokens": s["input_tokens"] - o["input_tokens"],
           "output_tokens": s["output_tokens"] - o["output_tokens"],
           "total_tokens": s["total_tokens"] - o["total_tokens"]}
    out = [f"{unit} {value} > {getattr(budget, unit)}" for unit, value in own.items()
           if getattr(budget, unit) is not None and value > getattr(budget, unit)]
    if budget.usd is not None and s["usd"] - o["usd"] > budget.usd * (1 + 1e-9):  # floats in the rows
        out.append(f"usd {s['usd']} > {budget.usd}")
    return out


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [f"fault injection: {report['questions']} questions, budget {c['budget']}, concurrency "
             f"{c['concurrency']}, --timeout {c['timeout_s']:g}, max_tokens {c['max_tokens']}, seed {c['seed']}"]
    for key in ("answered", "partial", "unanswered", "nothing_drawn", "failed_cleanly_with_spend",
                "failed_without_spend", "lost", "budget_violations", "requests", "minimum_requests",
                "requests_per_minimum", "charged_input_tokens", "billed_input_tokens", "charged_output_tokens",
                "billed_output_tokens", "undercharged", "server_overrun_output_tokens", "estimated_rows",
                "exit_code", "traceback", "wall_seconds"):
        lines.append(f"  {key:30s} {report[key]}")
    lines.append("  faults served: " + ", ".join(f"{k} {v}" for k, v in report["faults"].items()))
    return "\n".join(lines)
