"""`apportion bench` as a user runs it: over a real HTTP server, and replaying the shared bank."""

import json

import pytest

from tests.conftest import DATA, run_cli
from tests.support.fake_openai import FakeOpenAI


def test_bench_over_http_writes_a_run_directory_and_prints_the_table(tmp_path):
    questions = tmp_path / "qs.jsonl"
    questions.write_text("\n".join(json.dumps({"q": f"What is {i} times 6?", "gold": 42 if i == 7 else 6 * i})
                                   for i in (7, 2, 3)) + "\n")
    with FakeOpenAI(honor_n=False) as server:  # answers 42 to everything, one choice per request
        proc = run_cli("bench", "--dataset", str(questions), "--question-field", "q", "--answer-field", "gold",
                       "--budgets", "1,3", "--base-url", server.base_url, "--model", server.model,
                       "--price", "1,2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = {(r["algorithm"], r["budget"]): r for r in summary["rows"]}
    assert set(rows) == {("self-consistency", 1), ("self-consistency", 3), ("best-of-n", 1), ("best-of-n", 3)}
    assert all(abs(r["accuracy"] - 1 / 3) < 1e-9 for r in rows.values())  # only 7 x 6 is 42
    assert rows[("self-consistency", 3)]["output_tokens"] == 3 * rows[("self-consistency", 1)]["output_tokens"]
    assert rows[("self-consistency", 3)]["usd"] > 0
    assert "self-consistency" in proc.stdout and "33.3%" in proc.stdout
    bank = (tmp_path / "run" / "bank.jsonl").read_text().splitlines()
    assert len(bank) == 1 + 3 and len(json.loads(bank[1])["samples"]) == 3


def test_bench_replays_the_shared_bank_and_reports_it(tmp_path):
    proc = run_cli("bench", "--bank", str(DATA / "math_cot_100_samples.jsonl"), "--algorithms", "sc,bon",
                   "--budgets", "1,8", "--orders", "20", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = next(r for r in summary["rows"] if r["algorithm"] == "best-of-n" and r["budget"] == 8)
    assert best["scorer"] == "bank" and abs(best["accuracy"] - 0.95) < 1e-9
    assert set(best["by_level"]) == {"1", "2", "3", "4", "5"}
    proc = run_cli("report", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "data:image/png;base64," in page and "by_level" in proc.stdout
    proc = run_cli("report", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "summary.json" in proc.stderr
    proc = run_cli("report", str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "both"))
    assert proc.returncode == 2 and "both measure" in proc.stderr


def test_a_bank_without_token_counts_gets_estimated_ones_and_its_stop_rows_a_token_share(tmp_path):
    pytest.importorskip("llama_cpp")
    run = tmp_path / "run"
    proc = run_cli("bench", "--bank", str(DATA / "math_cot_100_samples.jsonl"), "--algorithms", "sc",
                   "--budgets", "1,8", "--limit", "10", "--orders", "3", "--stop", "esc:window=2", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    assert "token counts are estimated" in proc.stderr and "SmolLM2-135M-Instruct" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert "SmolLM2-135M-Instruct tokenizer" in summary["tokens_estimated"]
    assert all(r["output_tokens"] > 0 for r in summary["rows"])
    stop = next(r for r in summary["rows"] if "--stop" in r["algorithm"])
    assert "% of the full budget's output tokens" in stop["notes"][-1]
    assert summary["oracle"]["points"][-1]["output_tokens"] > 0
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    page = (run / "report" / "report.html").read_text()
    assert "tokens estimated" in page and "estimated: output tokens of 80 samples" in page
    assert (run / "report" / "stopping.png").is_file()


def test_bench_input_errors_name_the_problem(tmp_path):
    proc = run_cli("bench", "--dataset", "mawps_singleop", "--bank", "x.jsonl")
    assert proc.returncode == 2 and "not both" in proc.stderr
    proc = run_cli("bench", "--dataset", "no_such_set")
    assert proc.returncode == 2 and "unknown dataset" in proc.stderr
    proc = run_cli("bench", "--bank", str(DATA / "math_cot_100_samples.jsonl"), "--budgets", "1,two")
    assert proc.returncode == 2 and "--budgets" in proc.stderr
    proc = run_cli("bench", "--bank", str(DATA / "math_cot_100_samples.jsonl"), "--budgets", "16",
                   "--out", str(tmp_path / "too-big"))
    assert proc.returncode == 2 and "exceeds the bank" in proc.stderr  # a usage error, found reading the bank
    proc = run_cli("bench", "--bank", str(DATA / "math_cot_100_samples.jsonl"), "--max-tokens", "64")
    assert proc.returncode == 2 and "would be unused: --max-tokens" in proc.stderr
    proc = run_cli("bench", "--dataset", "gsm8k", "throughput")
    assert proc.returncode == 2 and "--dataset" in proc.stderr


def test_replay_serve_serves_a_bank_over_http(tmp_path):
    import subprocess
    import sys

    import httpx

    from tests.conftest import free_port, wait_for_server

    port = free_port()
    log = tmp_path / "replay-serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "apportion", "replay-serve",
                                 str(DATA / "math_cot_100_samples.jsonl"), "--port", str(port)],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_for_server(proc, url, log, limit_s=60)
        first = json.loads((DATA / "math_cot_100_samples.jsonl").read_text().splitlines()[0])
        body = {"model": httpx.get(f"{url}/models").json()["data"][0]["id"], "n": 3,
                "messages": [{"role": "user", "content": first["question"]}]}
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
        assert reply.status_code == 200, reply.text
        texts = [c["message"]["content"] for c in reply.json()["choices"]]
        assert len(texts) == 3 and all(t in first["code"] for t in texts)
        body["messages"][0]["content"] = "What is the meaning of life?"
        missing = httpx.post(f"{url}/chat/completions", json=body, timeout=10)
        assert missing.status_code == 404 and "not in the bank" in missing.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_bench_overhead_prints_its_table(tmp_path):
    proc = run_cli("bench", "overhead", "--budgets", "1,4", "--concurrency", "2", "--questions", "4",
                   "--repeats", "1", "--out", str(tmp_path / "overhead.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "overhead.json").read_text())
    assert len(report["cells"]) == 2 and "ratio" in proc.stdout
    proc = run_cli("bench", "overhead", "--budgets", "0")
    assert proc.returncode == 2


def test_bench_fit_prints_and_saves_the_laws_of_a_run(tmp_path):
    from tests.unit.test_scaling import _results

    run = _results(tmp_path)
    proc = run_cli("bench", "fit", str(run), "--target", "0.85", "--bootstrap", "20")
    assert proc.returncode == 0, proc.stderr
    assert "Scaling laws" in proc.stdout and "extrapolated" in proc.stdout
    assert json.loads((run / "fits.json").read_text())[0]["law"]["c"] == pytest.approx(0.9, abs=1e-3)
    bad = run_cli("bench", "fit", str(run), "--target", "2")
    assert bad.returncode == 2 and "--target must be an accuracy" in bad.stderr


@pytest.mark.embedded
def test_bench_throughput_reports_the_concurrency_and_shared_prefix_ratios(tmp_path):
    out = tmp_path / "throughput.json"
    proc = run_cli("bench", "throughput", "--repeats", "1", "--max-tokens", "8", "--prefix-tokens", "60",
                   "--concurrent-tokens", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    ratios = report["summary"]["ratios"]
    for key in ("concurrent8_over_sequential", "concurrent8_over_one_n8", "shared_prefix_prefill_speedup",
                "n8_over_n1_fixed_length"):
        assert ratios[key] > 0
    shared = report["runs"]["8 continuations of one shared prefix prefill"][0]
    independent = report["runs"]["8 independent prompts prefill"][0]
    # 7 of the 8 paths found the shared prefix (at least 60 tokens each); no independent prompt did
    assert shared["cached_input_tokens"] >= 7 * 60 and independent["cached_input_tokens"] < 8 * 10
    assert report["runs"]["8 requests n=1, concurrent (fixed length)"][0]["tokens"] == 64
    assert "prefix hit rate" in proc.stdout
