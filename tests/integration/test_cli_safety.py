"""The command line keeps its promises with careless command lines and misbehaving servers: no limit
passed, no paid sample dropped, no file lost, and one line naming the problem instead of a
traceback. Each test reproduces a way the CLI broke these before."""

import json

import pytest

from apportion.bench.faults.server import FaultServer
from tests.conftest import run_cli
from tests.support.fake_openai import FakeOpenAI

QUESTION = "What is 40 plus 2?"


def questions(tmp_path, n=3, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} plus 2?"}) + "\n"
                            for i in range(n)))
    return path


def http(server, *args):
    return ("--base-url", server.base_url, "--model", server.model, *args)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# -- budgets against servers that misbehave --------------------------------------------------


def test_a_server_that_ignores_n_cannot_push_input_past_its_limit():
    # 200 one-letter words: reserved at 472 tokens before the server has counted it, 203 after;
    # the samples the server left out are asked for again only while the input budget can pay
    question = "a " * 200
    with FakeOpenAI(honor_n=False) as server:
        proc = run_cli("run", question, *http(server, "--budget", "gen=4,input=472", "--json", "--system-prompt", ""))
    out = json.loads(no_traceback(proc).stdout)
    assert out["spent"]["input_tokens"] == server.billing.prompt_tokens == 2 * 203
    assert out["spent"]["generations"] == 2 and out["exhausted_reason"].startswith("input_tokens")


def test_a_file_run_on_a_server_that_ignores_n_stays_in_budget(tmp_path):
    out = tmp_path / "a.jsonl"
    with FakeOpenAI(honor_n=False) as server:
        proc = run_cli("run", "--file", str(questions(tmp_path, 4)), "--out", str(out),
                       *http(server, "--budget", "gen=8,input=300"))
    assert no_traceback(proc).returncode == 0, proc.stderr
    for row in rows(out):
        assert row["spent"]["input_tokens"] <= 300


def test_extra_choices_are_cut_and_shown():
    with FaultServer(script=["extra"]) as server:
        proc = run_cli("run", QUESTION, *http(server, "--budget", "4", "--json", "--max-tokens", "8"))
    out = json.loads(no_traceback(proc).stdout)
    assert out["spent"]["generations"] == 4 and len(out["candidates"]) == 4
    assert out["spent"]["server_overrun"]["output_tokens"] > 0
    assert out["spent"]["output_tokens"] == server.billing.completion_tokens
    assert any("overrun" in note for note in out["notes"])


# -- paid work is kept -----------------------------------------------------------------------


def test_a_failed_call_after_drawn_samples_is_a_partial_answer(tmp_path):
    # one choice for n=8, then the seven requests for the others are refused for good
    with FakeOpenAI(honor_n=False, faults=["ok"] + ["400"] * 7) as server:
        proc = run_cli("run", QUESTION, *http(server, "--budget", "8", "--json"))
    out = json.loads(no_traceback(proc).stdout)
    assert proc.returncode == 0
    assert out["partial"] is True and "HTTP 400" in out["error"]
    assert out["answer"] == "42" and out["spent"]["generations"] == 1
    assert out["spent"]["input_tokens"] == server.billing.prompt_tokens
    assert "partial" in proc.stderr
    out_file = tmp_path / "a.jsonl"
    with FakeOpenAI(honor_n=False, faults=["ok"] + ["400"] * 7) as server:
        proc = run_cli("run", "--file", str(questions(tmp_path, 2)), "--out", str(out_file),
                       *http(server, "--budget", "8", "--concurrency", "1"))
    assert no_traceback(proc).returncode == 0 and "1 of them partial" in proc.stderr
    partial = [r for r in rows(out_file) if r["partial"]]
    assert len(partial) == 1 and partial[0]["answer"] == "42" and partial[0]["status"] == "answered"


def test_nothing_drawn_reports_the_error_and_the_spend(tmp_path):
    with FaultServer(script=["garbage"] * 10) as server:
        proc = run_cli("run", QUESTION, *http(server, "--budget", "gen=2", "--json"))
    assert no_traceback(proc).returncode == 1
    out = json.loads(proc.stdout)
    assert out["answer"] is None and "malformed" in out["error"]
    assert out["spent"]["output_tokens"] >= server.billing.completion_tokens > 0
    assert "spent" in proc.stderr


def test_a_hanging_server_is_bounded_by_timeout():
    with FaultServer(script=["hang"] * 10) as server:
        proc = run_cli("run", QUESTION, *http(server, "--budget", "2", "--timeout", "0.5"), timeout=30)
    assert no_traceback(proc).returncode == 1
    assert "no complete reply within 0.5 s" in proc.stderr


# -- files -----------------------------------------------------------------------------------


def test_out_equal_to_file_is_refused_and_the_questions_survive(tmp_path):
    path = questions(tmp_path)
    before = path.read_text()
    with FakeOpenAI() as server:
        proc = run_cli("run", "--file", str(path), "--out", str(tmp_path / "." / "q.jsonl"), *http(server))
    assert no_traceback(proc).returncode == 2 and "is the input file" in proc.stderr
    assert path.read_text() == before


def test_an_existing_out_is_replaced_only_when_done_and_said_so(tmp_path):
    out = tmp_path / "a.jsonl"
    out.write_text('{"old": 1}\n{"old": 2}\n')
    with FakeOpenAI() as server:
        proc = run_cli("run", "--file", str(questions(tmp_path)), "--out", str(out), *http(server, "--budget", "2"))
    assert no_traceback(proc).returncode == 0
    assert "replacing its 2 earlier line(s)" in proc.stderr
    assert len(rows(out)) == 3 and not (tmp_path / "a.jsonl.partial").exists()


def test_rows_stand_alone(tmp_path):
    out = tmp_path / "a.jsonl"
    with FakeOpenAI() as server:
        run_cli("run", "--file", str(questions(tmp_path)), "--out", str(out), *http(server, "--budget", "2"))
    for row in rows(out):
        assert row["question"].startswith("What is") and row["id"].startswith("q") and row["line"] >= 1
        assert row["status"] == "answered"


@pytest.mark.parametrize("case", ["missing dir", "directory", "missing file", "concurrency 0"])
def test_bad_paths_and_options_are_usage_errors(tmp_path, case):
    q = questions(tmp_path)
    args = {"missing dir": ["--file", str(q), "--out", str(tmp_path / "nope" / "a.jsonl")],
            "directory": ["--file", str(q), "--out", str(tmp_path)],
            "missing file": ["--file", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "a.jsonl")],
            "concurrency 0": ["--file", str(q), "--out", str(tmp_path / "a.jsonl"), "--concurrency", "0"]}[case]
    proc = no_traceback(run_cli("run", *args))
    assert proc.returncode == 2, proc.stderr
    expected = {"missing dir": "does not exist", "directory": "is a directory", "missing file": "no such file",
                "concurrency 0": "--concurrency must be >= 1"}[case]
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_invalid_utf8_is_one_bad_line_not_a_crash(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"question": "What is 1 plus 2?"}\n{"question": "caf\xe9"}\n{"question": "2 + 2?"}\n')
    out = tmp_path / "a.jsonl"
    with FakeOpenAI() as server:
        proc = no_traceback(run_cli("run", "--file", str(path), "--out", str(out), *http(server, "--budget", "1")))
    assert proc.returncode == 1  # one line could not be read
    by_line = {r["line"]: r for r in rows(out)}
    assert "not valid UTF-8" in by_line[2]["error"] and by_line[1]["answer"] == by_line[3]["answer"] == "42"


def test_a_run_that_could_sample_nothing_does_not_claim_answers(tmp_path):
    out = tmp_path / "a.jsonl"
    with FakeOpenAI() as server:
        proc = no_traceback(run_cli("run", "--file", str(questions(tmp_path)), "--out", str(out),
                                    *http(server, "--budget", "tokens=20")))
    assert proc.returncode == 1
    assert "0 of 3 answered" in proc.stderr and "3 drew no sample" in proc.stderr
    assert {r["status"] for r in rows(out)} == {"nothing drawn"}


def test_a_base_url_without_v1_suggests_the_path():
    with FaultServer() as server:
        root = server.base_url.removesuffix("/v1")
        proc = no_traceback(run_cli("run", QUESTION, "--base-url", root, "--model", server.model))
    assert proc.returncode == 2 and f"try --base-url {root}/v1" in proc.stderr


# -- bench -----------------------------------------------------------------------------------


def test_bench_never_truncates_a_run_directory(tmp_path):
    data = tmp_path / "qs.jsonl"
    data.write_text(json.dumps({"question": "What is 40 plus 2?", "answer": 42}) + "\n")
    run = tmp_path / "run"
    with FakeOpenAI() as server:
        first = run_cli("bench", "--dataset", str(data), "--budgets", "1,2", "--algorithms", "sc",
                        "--out", str(run), *http(server))
        assert first.returncode == 0, first.stderr
        bank = (run / "bank.jsonl").read_bytes()
        again = no_traceback(run_cli("bench", "--dataset", str(data), "--budgets", "1,2", "--algorithms", "sc",
                                     "--out", str(run), *http(server)))
    assert again.returncode == 2 and "--resume" in again.stderr
    assert (run / "bank.jsonl").read_bytes() == bank


def test_bench_input_errors_are_one_line(tmp_path):
    array = tmp_path / "array.jsonl"
    array.write_text('["a", "b"]\n')
    proc = no_traceback(run_cli("bench", "--dataset", str(array)))
    assert proc.returncode == 2 and "expected a JSON object" in proc.stderr
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    data = tmp_path / "qs.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": 1}) + "\n")
    proc = no_traceback(run_cli("bench", "--dataset", str(data), "--out", str(a_file)))
    assert proc.returncode == 2 and "is a file" in proc.stderr


def test_the_scratch_file_of_out_is_never_an_input_or_an_earlier_runs_rows(tmp_path):
    scratch_input = tmp_path / "a.jsonl.partial"
    scratch_input.write_text('{"question": "What is 1 + 1?"}\n')
    with FakeOpenAI() as server:
        proc = no_traceback(run_cli("run", "--file", str(scratch_input), "--out", str(tmp_path / "a.jsonl"),
                                    *http(server)))
    assert proc.returncode == 2 and "a.jsonl.partial exists" in proc.stderr
    assert scratch_input.read_text() == '{"question": "What is 1 + 1?"}\n'
    kept = tmp_path / "b.jsonl.partial"
    kept.write_text('{"answer": "rows of an interrupted run"}\n')
    with FakeOpenAI() as server:
        proc = no_traceback(run_cli("run", "--file", str(questions(tmp_path)), "--out", str(tmp_path / "b.jsonl"),
                                    *http(server)))
    assert proc.returncode == 2 and "interrupted run" in kept.read_text()


def test_text_that_is_not_utf8_is_refused_per_line_and_per_prompt(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "What is 1 plus 2?"}\n{"question": "What is \\ud800 2 + 2?"}\n'
                    '{"question": "2 + 2?"}\n')
    out = tmp_path / "a.jsonl"
    with FakeOpenAI() as server:
        proc = no_traceback(run_cli("run", "--file", str(path), "--out", str(out), *http(server, "--budget", "1")))
        by_line = {r["line"]: r for r in rows(out)}
        assert sorted(by_line) == [1, 2, 3] and "surrogate" in by_line[2]["error"]
        proc = no_traceback(run_cli("run", "-", *http(server), stdin_bytes=b"What is \xff\xfe 2 + 2?"))
    assert proc.returncode == 2 and "not valid UTF-8" in proc.stderr


def test_benchmark_reports_are_checked_before_the_benchmark_runs(tmp_path):
    proc = no_traceback(run_cli("bench", "faults", "--questions", "2", "--out", str(tmp_path)))
    assert proc.returncode == 2 and "is a directory" in proc.stderr
    proc = no_traceback(run_cli("bench", "faults", "--shares", "ok=0"))
    assert proc.returncode == 2 and "weight above 0" in proc.stderr
