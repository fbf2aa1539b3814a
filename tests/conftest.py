import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apportion.serve.runner import wait_until_up

ROOT = Path(__file__).resolve().parent.parent


def examples(default: int) -> int:
    """Cases for a property test: ``default`` in the suite, ``PROPERTY_EXAMPLES`` for a long run
    (``PROPERTY_EXAMPLES=10000 pytest tests/unit/test_http_faults.py``)."""
    return int(os.environ.get("PROPERTY_EXAMPLES", default))
DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, stdin: str | None = None, stdin_bytes: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a child process, as a user runs it (``stdin_bytes``: raw input)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "apportion", *args], capture_output=True, timeout=timeout, env=env,
                          input=stdin_bytes if stdin_bytes is not None else (stdin or "").encode())
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def cli_json(*args: str) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="session")
def gguf() -> Path:
    from apportion.lm import default_model_path

    return default_model_path()  # fails loudly (ModelNotFound) where the model is not installed


@pytest.fixture(scope="session")
def llama_server(gguf):
    """A real OpenAI-compatible server (llama-cpp-python's) on 127.0.0.1 with the embedded GGUF."""
    port = free_port()
    log_path = ROOT / ".pytest_cache" / "llama_server.log"
    log_path.parent.mkdir(exist_ok=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(port), "--model_alias", "smollm2", "--n_ctx", "4096", "--verbose", "False"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/v1"
            wait_for_server(proc, url, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_for_server(proc: subprocess.Popen, url: str, log_path: Path, limit_s: float = 120) -> None:
    """Fail the test, with the server's own log, if it does not come up."""
    try:
        wait_until_up(url, proc, timeout_s=limit_s, poll_s=0.2)
    except RuntimeError as exc:
        pytest.fail(f"{' '.join(map(str, proc.args[:4]))}: {exc}: {log_path.read_text()[-2000:]}")
