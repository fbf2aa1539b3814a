"""The command line's contract: clear errors with non-zero exits, and file mode that survives bad lines."""

import json

from tests.conftest import free_port, run_cli
from tests.support.fake_openai import FakeOpenAI

QUESTION = "What is 40 plus 2?"


def test_help_lists_the_options():
    proc = run_cli("run", "--help")
    assert proc.returncode == 0
    for option in ("--algorithm", "--budget", "--base-url", "--model", "--json", "--file", "--seed"):
        assert option in proc.stdout


def test_unknown_algorithm():
    proc = run_cli("run", QUESTION, "--algorithm", "magic")
    assert proc.returncode == 2
    assert "unknown algorithm 'magic'" in proc.stderr and "self-consistency" in proc.stderr


def test_budget_must_be_positive():
    for bad in ("0", "-1", "gen=0", "tokens=abc"):
        proc = run_cli("run", QUESTION, "--budget", bad)
        assert proc.returncode == 2, bad
        assert "budget" in proc.stderr


def test_unreachable_server():
    proc = run_cli("run", QUESTION, "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m")
    assert proc.returncode == 1
    assert "cannot reach" in proc.stderr


def test_missing_model_file(tmp_path):
    proc = run_cli("run", QUESTION, "--model-path", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2
    assert "model file not found" in proc.stderr


def test_base_url_needs_a_model_and_usd_needs_a_price():
    with FakeOpenAI() as server:
        proc = run_cli("run", QUESTION, "--base-url", server.base_url)
        assert proc.returncode == 2 and "--model" in proc.stderr
        proc = run_cli("run", QUESTION, "--base-url", server.base_url, "--model", server.model,
                       "--budget", "usd=0.01")
        assert proc.returncode == 2 and "--price" in proc.stderr


def test_prompt_xor_file():
    proc = run_cli("run")
    assert proc.returncode == 2 and "PROMPT or --file" in proc.stderr


def test_prompt_from_stdin_and_json_over_http():
    with FakeOpenAI() as server:
        proc = run_cli("run", "-", "--base-url", server.base_url, "--model", server.model, "--json",
                       "--budget", "gen=3,tokens=2000", "--price", "1,2", stdin=QUESTION)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["answer"] == "42"
        assert out["distribution"] == {"42": 3}
        billed = server.billing
        assert out["spent"]["input_tokens"] == billed.prompt_tokens
        assert out["spent"]["output_tokens"] == billed.completion_tokens
        assert out["spent"]["usd"] == (billed.prompt_tokens * 1 + billed.completion_tokens * 2) / 1e6
        assert billed.bodies[0]["messages"][-1]["content"] == QUESTION


def test_file_mode_reports_bad_lines_and_answers_the_rest(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join([
        json.dumps({"id": "a", "question": "What is 40 plus 2?"}),
        "{not json",
        json.dumps({"id": "c", "text": "wrong field"}),
        "",
        json.dumps({"id": "d", "problem": "What is 6 times 7?"}),
        json.dumps("A bare string prompt: 21 + 21?"),
    ]) + "\n")
    out = tmp_path / "answers.jsonl"
    with FakeOpenAI() as server:
        proc = run_cli("run", "--file", str(questions), "--out", str(out), "--base-url", server.base_url,
                       "--model", server.model, "--budget", "2", "--concurrency", "3")
    assert proc.returncode == 1  # some lines failed; the others were answered
    rows = {r["line"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 5, 6]
    assert rows[1]["id"] == "a" and rows[1]["answer"] == "42"
    assert "not valid JSON" in rows[2]["error"]
    assert rows[3]["id"] == "c" and "no prompt field" in rows[3]["error"]
    assert rows[5]["answer"] == "42" and rows[6]["answer"] == "42"
    assert "3 of 5 answered" in proc.stderr
    assert "line 2: not valid JSON" in proc.stderr


def test_file_mode_needs_out(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "x"}\n')
    proc = run_cli("run", "--file", str(f))
    assert proc.returncode == 2 and "--out" in proc.stderr


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("apportion ")


def test_stop_rule_from_the_command_line():
    with FakeOpenAI() as server:
        proc = run_cli("run", QUESTION, "--base-url", server.base_url, "--model", server.model, "--json",
                       "--budget", "8", "--stop", "esc:window=2")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["stop_reason"] == "esc" and out["spent"]["generations"] == 2 and not out["exhausted"]
        assert server.billing.requests == 1 and server.billing.bodies[0]["n"] == 2
        proc = run_cli("run", QUESTION, "--base-url", server.base_url, "--model", server.model, "--stop", "magic")
        assert proc.returncode == 2 and "unknown stop rule 'magic'" in proc.stderr
