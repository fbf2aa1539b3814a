"""`apportion batch --executor ray` as a user runs it: over a real HTTP server (a bank served by
replay-serve), the same rows and allocation report as the local executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, run_cli, wait_for_server
from tests.unit.test_executors import QUESTIONS, _bank


def _batch_against_a_fresh_server(tmp_path: Path, executor: str, port: int) -> tuple[list[dict], dict]:
    """A fresh server each time (on one port: rows name the server): the bank's serving order
    restarts, as for a new run."""
    bank, questions = tmp_path / "bank.jsonl", tmp_path / "questions.jsonl"
    _bank().save(bank)
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    log, out = tmp_path / f"serve-{executor}.log", tmp_path / f"{executor}.jsonl"
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "apportion", "replay-serve", str(bank), "--port", str(port),
                                   "--seed", "3"], stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_for_server(server, url, log, limit_s=60)
        proc = run_cli("batch", str(questions), "--total-budget", "gen=17,tokens=2000", "--policy", "marginal-gain",
                       "--base-url", url, "--model", "bank-model", "--price", "1,3", "--max-tokens", "40",
                       "--system-prompt", "Answer.", "--seed", "3", "--out", str(out), "--executor", executor)
    finally:
        server.terminate()
        server.wait(10)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads(out.with_name(out.name + ".allocation.json").read_text())


def _timeless(value):
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items() if k not in ("seconds", "latency_s")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def test_ray_and_local_batches_write_the_same_rows_and_report(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'apportion[ray]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the command's own throwaway instance writes no token
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    local_rows, local_report = _batch_against_a_fresh_server(tmp_path, "local", port)
    ray_rows, ray_report = _batch_against_a_fresh_server(tmp_path, "ray", port)
    assert _timeless(ray_rows) == _timeless(local_rows)
    assert _timeless(ray_report) == _timeless(local_report)
    assert [r["status"] for r in ray_rows] == ["answered"] * len(QUESTIONS)
    assert ray_report["spent"]["generations"] == 17


def test_executor_usage_errors(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "What is 2 + 2?"}) + "\n")
    common = ("batch", str(questions), "--total-budget", "4", "--out", str(tmp_path / "o.jsonl"),
              "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    proc = run_cli(*common, "--executor", "slurm")
    assert proc.returncode == 2 and "unknown executor 'slurm'" in proc.stderr
    proc = run_cli(*common, "--ray-address", "auto")
    assert proc.returncode == 2 and "--ray-address goes with --executor ray" in proc.stderr
    # without Ray installed: a usage error that says how to get it, before any work
    hide_ray = "import sys; sys.modules['ray'] = None; from apportion.cli import main; main()"
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-c", hide_ray, *common, "--executor", "ray"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "pip install 'apportion[ray]'" in proc.stderr
