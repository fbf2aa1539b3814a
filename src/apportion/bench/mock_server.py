"""The instant OpenAI-compatible server that the overhead benchmark measures against.

``openai_app`` over an ``InstantBackend`` (every request answered at once, n honoured, requests
and samples counted, ``GET /mock/stats`` to read the counts), run by ``MockServer`` in a process
of its own.

Every sample's text is its own (``reply_text``): a few sentences of worked arithmetic whose
numbers, wording, final answer and answer format (``The answer is``, ``\\boxed{}``, ``####``,
``Answer:``, a bare last number; "$42", "42.00", "42 apples") depend on the request's seed and the
sample's index, so that no cache on the client can hide the cost of reading, extracting and
normalising answers. Half the samples agree on the majority answer and the rest spread over a few
others, as a self-consistency vote sees. Built from integer arithmetic and string formatting, a
few microseconds a sample, and deterministic: the same body gets the same reply.
"""

from __future__ import annotations

import subprocess
import sys
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from apportion.budget.units import Price, Usage
from apportion.lm.base import Capabilities, Completion, Prompt, Sample, SamplingParams
from apportion.serve.openai_app import openai_app
from apportion.serve.runner import bind_free_port, uvicorn_config, wait_until_up

MOCK_MODEL = "instant"
REPLY = "The answer is 42."
"""The text of ``InstantBackend(distinct=False)``: every sample the same (the server before
replies were made distinct)."""
REPLY_TOKENS = 5
"""Output tokens of every sample, whatever its text: token counts stay exact for the checks."""
REPLY_LOGPROB = -0.05
"""The log-probability of every token of ``REPLY``; distinct replies vary theirs around it."""
_MASK64 = (1 << 64) - 1
_NAMES = ("Tom", "Ana", "Li", "Sam", "Maya", "Omar", "Jo", "Kai")
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells")
_OPENINGS = ("{name} starts with {a} {things} and gets {b} more, which makes {a} + {b} = {c}.",
             "First, {a} + {b} = {c} {things} in all.",
             "Let's add: {name} has {a} {things}, then {b} more arrive, so the total is {c}.",
             "We begin with {a} and add {b}: {c} {things}.")
_MIDDLES = ("Then {d} are given away, leaving {c} - {d} = {e}.",
            "After giving away {d}, {e} remain.",
            "Taking away {d} leaves {e} {things}.",
            "Subtracting the {d} that were eaten gives {e}.")
# How the final answer is written (sample bits pick one; most say "The answer is").
_ENDINGS = ("The answer is {x}.", "The answer is {x}.", "The answer is {x}.", "So the answer is {x} {things}.",
            "The answer is ${x}.", "The answer is {x}.00.", "Therefore the answer is \\boxed{{{x}}}.",
            "#### {x}", "Answer: {x}", "So {name} ends up with {x} {things}.")


def _mix(value: int) -> int:
    """splitmix64's finaliser: well-spread bits from consecutive integers."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def reply_text(seed: int, index: int) -> str:
    """Sample ``index`` of a request seeded ``seed``: distinct wording and numbers, and a final
    answer that is 42 for about half the samples and one of eight others for the rest."""
    bits = _mix(seed * 1_000_003 + index)
    a, b = 3 + bits % 97, 2 + (bits >> 8) % 53
    c = a + b
    d = (bits >> 16) % c
    answer = 42 if (bits >> 24) % 2 == 0 else 38 + (bits >> 25) % 8 * 3
    fields = {"name": _NAMES[(bits >> 28) % 8], "things": _THINGS[(bits >> 31) % 8], "a": a, "b": b, "c": c,
              "d": d, "e": c - d, "x": answer}
    return " ".join((_OPENINGS[(bits >> 34) % 4].format(**fields), _MIDDLES[(bits >> 36) % 4].format(**fields),
                     f"Checking once more with {(bits >> 38) % 90 + 10} and {(bits >> 45) % 90 + 10}.",
                     _ENDINGS[(bits >> 52) % 10].format(**fields)))


def reply_logprobs(seed: int, index: int, tokens: int) -> tuple[float, ...]:
    """Per-token log-probabilities of a distinct reply: near ``REPLY_LOGPROB``, not all equal."""
    bits = _mix(seed * 1_000_003 + index + 0x5151)
    return tuple(-(5 + ((bits >> (t % 60)) & 15)) / 100 for t in range(tokens))
_START_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


class InstantBackend:
    """Answers every request at once with n samples of ``reply_tokens`` tokens each (exact token
    counts, log-probabilities when asked), counting what it served. ``distinct``: every sample's
    text is its own (``reply_text`` of the request's seed, 0 without one, and the sample's
    index); else every sample is ``reply``."""

    def __init__(self, *, model: str = MOCK_MODEL, reply: str = REPLY, reply_tokens: int = REPLY_TOKENS,
                 distinct: bool = True) -> None:
        self._model = model
        self.reply = reply
        self.reply_tokens = reply_tokens
        self.distinct = distinct
        self.requests = 0
        self.samples = 0

    @property
    def model(self) -> str:
        return self._model

    @property
    def name(self) -> str:
        return "instant"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(native_n=True, logprobs=True, continuation=False, prefix_cache=False,
                            raw_prompt=True, exact_prompt_tokens=True)

    @property
    def price(self) -> Price:
        return Price()

    async def prompt_tokens(self, prompt: Prompt) -> int:
        parts = [m.content for m in prompt.messages] if prompt.is_chat else [prompt.text or ""]
        return sum(len(p.split()) for p in parts) + 3 * len(prompt.messages)

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        tokens = min(self.reply_tokens, params.max_tokens)
        finish = "length" if tokens < self.reply_tokens else "stop"
        if self.distinct:
            seed = params.seed or 0
            samples = tuple(Sample(reply_text(seed, i), finish, tokens,
                                   reply_logprobs(seed, i, tokens) if params.logprobs else None)
                            for i in range(params.n))
        else:
            logprobs = (REPLY_LOGPROB,) * tokens if params.logprobs else None
            samples = (Sample(self.reply, finish, tokens, logprobs),) * params.n
        self.requests += 1  # one event loop serves every request: no lock needed
        self.samples += params.n
        usage = Usage(params.n, await self.prompt_tokens(prompt), tokens * params.n)
        return Completion(samples, usage, self.model, 0.0)

    async def aclose(self) -> None:
        return None


def mock_app(backend: InstantBackend) -> Starlette:
    """``openai_app(backend)`` plus ``GET /mock/stats``: the requests and samples served so far."""

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse({"requests": backend.requests, "samples": backend.samples})

    return Starlette(routes=[Route("/mock/stats", stats), Mount("/", openai_app(backend))])


def serve_mock() -> None:
    """Entry point of the server process: bind, print the port on stdout, serve until SIGTERM."""
    sock = bind_free_port()
    print(sock.getsockname()[1], flush=True)  # the parent reads this one line
    uvicorn.Server(uvicorn_config(mock_app(InstantBackend()))).run(sockets=[sock])


class MockServer:
    """The instant server in its own process.

    Why a process and not a thread: the client under test and the server are both Python, and in
    one process the GIL would run them in turn, so every client-side millisecond would also
    delay the server and the bare baseline would carry the server's cost interleaved with the
    client's. With two cores, a separate process gives the server its own core and the
    measurement sees only the client. A plain subprocess rather than multiprocessing: its "spawn"
    re-imports the parent's __main__ (a script, ``python -m apportion``), and fork is unsafe in a
    process with threads (pytest, a running ServedApp)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the mock server is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __enter__(self) -> MockServer:
        code = "from apportion.bench.mock_server import serve_mock; serve_mock()"
        self._process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise RuntimeError(f"the mock server did not start (it said {line!r}; its errors are above)")
        self._port = int(line)
        self._wait_until_up()
        return self

    def _wait_until_up(self) -> None:
        try:
            wait_until_up(self.base_url, self._process, timeout_s=_START_TIMEOUT_S)
        except RuntimeError as exc:
            self.__exit__(None, None, None)
            raise RuntimeError(f"the mock server did not answer: {exc}") from None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        process, self._process, self._port = self._process, None, None
        if process is not None:
            stop_process(process)


def stop_process(process: subprocess.Popen[str], timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """Stop a server process: SIGTERM (uvicorn shuts down gracefully), SIGKILL if it does not end in
    ``timeout_s``, and close the pipe it printed its port on."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)
    if process.stdout is not None:
        process.stdout.close()
