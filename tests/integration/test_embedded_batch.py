"""A file under one total budget on the embedded model, through the command line: every line
answered or accounted for, the total never exceeded, the allocation reported."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.embedded

QUESTIONS = ["What is 2 plus 3?", "What is 10 minus 4?", "What is 6 times 2?"]


def test_batch_under_a_total_token_budget(tmp_path):
    src = tmp_path / "q.jsonl"
    src.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, q in enumerate(QUESTIONS))
                   + "not json\n")
    out = tmp_path / "a.jsonl"
    proc = run_cli("batch", str(src), "--total-budget", "tokens=1500", "--policy", "marginal-gain",
                   "--out", str(out), "--max-tokens", "64", "--seed", "0", "--temperature", "0.3")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["status"] == "invalid" and proc.returncode == 1  # the bad line is reported, not dropped
    report = json.loads((tmp_path / "a.jsonl.allocation.json").read_text())
    spent = report["spent"]
    assert spent["input_tokens"] + spent["output_tokens"] <= 1500
    per_prompt = [r["spent"]["input_tokens"] + r["spent"]["output_tokens"] for r in rows[:3]]
    assert sum(per_prompt) == spent["input_tokens"] + spent["output_tokens"]
    assert all(r["allocation"]["rounds"] >= 1 and r["spent"]["generations"] >= 2 for r in rows[:3])
    assert all(c["model"] for r in rows[:3] for c in r["candidates"])
    assert sum(b["tokens"] for b in report["per_bin"].values()) == sum(per_prompt)
