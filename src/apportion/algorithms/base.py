"""What all algorithms share: options for sampling, the per-run context, the sampling loop.

An algorithm is options plus ``stream(lm, prompt, budget)``, an async iterator of interim
Results ending with the final one; ``run`` drains it. The budget is either a Budget (a fresh
ledger is opened) or a Ledger (a sub-budget handed down by a caller, whose spend rolls up).
``prior`` resumes a prompt: candidates an earlier run on the same prompt drew (a batch
allocator topping up a prompt between rounds) take part in the selection as if drawn here; they
were charged where they were drawn, so a resumed run is given the same ledger, topped up.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from apportion._sync import run_sync
from apportion.algorithms.prompting import PromptMode, apply_prompt_mode
from apportion.algorithms.stopping import Seen, StopRule
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import placeholder_in, read_answer_for
from apportion.answers.freeform import ANSWER_MODES, AnswerMode, FreeFormAnswers, TextEquivalence, check_answer_mode
from apportion.budget.ledger import CallRecord, Ledger
from apportion.budget.units import Budget
from apportion.errors import BackendError, BudgetError, BudgetExhausted, ConfigError, RunFailed
from apportion.lm.base import Backend, Completion, Prompt, Sample, SamplingParams
from apportion.lm.metered import MeteredLM, cut_afterwards_note
from apportion.result import Candidate, Result, SearchStats

# Chosen on the embedded model, greedy, first 40 MAWPS SingleOp questions: this prompt 7/40 right;
# "Solve the problem step by step. End your reply with a final line of the form 'The answer is
# X'..." 0/40; no system prompt (SmolLM2's default) 4/40. Small models ramble when told to reason
# step by step; "briefly" keeps them on the arithmetic.
DEFAULT_SYSTEM_PROMPT = "Solve the problem briefly. End with 'The answer is N'."
# Without a generation limit (a token, dollar or time budget only), samples are drawn this many
# at a time until the budget refuses the next batch.
DEFAULT_BATCH = 8
# A seed per call, so that rounds of sampling never repeat one another.
_SEED_STRIDE = 7919


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """How candidate solutions are sampled (shared by every sampling-based algorithm)."""

    max_tokens: int = 512
    temperature: float = 0.8
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    batch_size: int | None = None
    """Samples per call; None: all the generations the budget allows at once (8 per call when
    the budget sets no generation limit)."""
    min_tokens: int = 32
    """Do not start a sample the budget cannot give this many tokens (it would not finish)."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    logprobs: bool = True
    top_logprobs: int = 0
    """Keep per-token confidences over this many alternatives (confidence rules ask for more)."""
    prompt_mode: PromptMode | None = None
    """Reword the question to spend fewer tokens per answer: ``Tale`` or ``ChainOfDraft``
    (``algorithms/prompting.py``); None is the plain prompt."""
    answers: AnswerMode = "math"
    """How a reply becomes the answer the vote counts: "math" extracts a final answer; "text" takes
    the whole reply, normalised; "judge" also asks the model which replies say the same thing
    (``answers/freeform.py``). Free-form modes drop the default system prompt, a math instruction."""

    def __post_init__(self) -> None:
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                       stop=self.stop, top_logprobs=self.top_logprobs)  # one message set for shared fields
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.min_tokens < 1:
            raise ConfigError(f"min_tokens must be >= 1, got {self.min_tokens}")
        if self.answers not in ANSWER_MODES:
            raise ConfigError(f"answers must be one of {', '.join(ANSWER_MODES)}, got {self.answers!r}")


@dataclass(slots=True)
class RunContext:
    """Everything one run of one algorithm on one prompt needs."""

    lm: MeteredLM
    prompt: Prompt
    question: str
    budget: Budget
    seed: int | None
    equivalence: Equivalence
    algorithm: str
    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    """The failure that ended the run early, if one did (the candidates drawn before it are kept)."""
    stop_reason: str | None = None
    """The stopping rule that ended the run before its budget did, if one did."""
    placeholder: str | None = None
    """The answer placeholder of the system prompt ("N" in "The answer is N"): copied, it is no answer."""
    free_form: FreeFormAnswers | None = None
    """How answers are read and clustered in the "text" and "judge" modes; None: math answers."""

    @property
    def ledger(self) -> Ledger:
        return self.lm.ledger

    async def apply_prompt_mode(self, mode: PromptMode | None) -> None:
        """Reword ``prompt`` for ``mode`` before any sample is drawn (a TALE estimate asked of the
        model is charged to this run as planning)."""
        if mode is not None:
            self.prompt, notes = await apply_prompt_mode(mode, self.lm, self.prompt, self.question, self.seed)
            self.notes.extend(notes)

    def fail(self, exc: BaseException) -> None:
        self.error = self.error or str(exc)

    async def request(self, lm: MeteredLM, prompt: Prompt, params: SamplingParams,
                      min_tokens: int) -> tuple[Completion | None, bool]:
        """One request for a piece of this run (a step, a debate turn): its completion (None where
        the budget refused it or it failed) and whether the budget refused it. A failure ends the
        run (``fail``); a sample the deadline cut ends it at the deadline."""
        try:
            completion = await lm.generate(prompt, params, min_tokens=min_tokens)
        except BudgetExhausted:
            return None, True
        except BackendError as exc:
            self.fail(exc)
            return None, False
        if completion.error is not None:
            self.fail(completion.error)
        if any(x.finish_reason == "deadline" for x in completion.samples):
            self.stop_reason = "deadline"
        return completion, False

    def candidate(self, sample: Sample) -> Candidate:
        return self.candidates((sample,))[0]

    def candidates(self, samples: Sequence[Sample]) -> list[Candidate]:
        """A candidate per sample, its answer read (a sample cut mid-thought has none: whatever it
        said so far is no answer)."""
        if self.free_form is not None:
            return self.free_form.candidates(samples, self.lm.backend.model)
        model, placeholder, make = self.lm.backend.model, self.placeholder, Candidate.from_sample
        return [make(s, None, None, None, model) if s.finish_reason == "cut"
                else make(s, *read_answer_for(s.text, placeholder), model) for s in samples]

    def result(self, *, answer: str | None, response: str | None, candidates: Sequence[Candidate],
               distribution: dict[str, float], final: bool, search: SearchStats | None = None) -> Result:
        ledger = self.ledger
        trace = tuple(ledger.trace)
        return Result(
            answer=answer,
            response=response,
            algorithm=self.algorithm,
            candidates=tuple(candidates),
            distribution=distribution,
            spent=ledger.spend(),
            budget=self.budget,
            exhausted=ledger.exhausted,
            exhausted_reason=ledger.exhausted_reason,
            final=final,
            seed=self.seed,
            backend=self.lm.backend.name,
            model=self.lm.backend.model,
            trace=trace,
            notes=tuple(dict.fromkeys([*self.notes, *server_warnings(trace)])),
            options=self.options,
            error=self.error,
            stop_reason=self.stop_reason,
            search=search,
        )


class Algorithm(ABC):
    """Base of all algorithms. Subclasses set ``name`` and implement ``stream``."""

    name: ClassVar[str]
    uses_tools: ClassVar[bool] = False
    """Whether it makes tool calls: a budget of tool calls alone cannot limit one that does not."""

    def __init__(self, *, equivalence: Equivalence | None = None) -> None:
        self.equivalence = equivalence or Equivalence()

    @abstractmethod
    def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
               seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        """Interim results as the work proceeds; the last one has ``final=True``."""

    async def run(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                  seed: int | None = None, prior: Sequence[Candidate] = ()) -> Result:
        last: Result | None = None
        async for result in self.stream(lm, prompt, budget, seed=seed, prior=prior):
            last = result
        if last is None or not last.final:  # pragma: no cover - every stream ends with a final result
            raise RuntimeError(f"{self.name} ended without a final result")
        if last.error is not None and not last.candidates:
            raise RunFailed(last.error, last)
        return last

    def run_sync(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                 seed: int | None = None) -> Result:
        """``run`` for synchronous callers; works inside a running event loop (notebooks) too."""
        return run_sync(self.run(lm, prompt, budget, seed=seed))

    def options_dict(self) -> dict[str, Any]:
        options = getattr(self, "options", None)
        if options is None:
            return {}
        out = _asdict(options)
        rule = getattr(options, "stopping", None)
        if "stopping" in out:
            out["stopping"] = rule.describe() if rule is not None else None
        return out

    def context(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, seed: int | None,
                system_prompt: str | None) -> RunContext:
        if isinstance(budget, Ledger):
            ledger = budget
        elif isinstance(budget, Budget):
            ledger = Ledger(budget)
        else:
            raise BudgetError(f"budget must be a Budget or a Ledger, got {type(budget).__name__}")
        # A parent ledger may bind what this one's budget does not.
        check_budget_can_bind(ledger.budget, lm, self if ledger.parent is None else None)
        mode = check_answer_mode(self)
        if mode != "math" and system_prompt == DEFAULT_SYSTEM_PROMPT:
            system_prompt = None  # "End with 'The answer is N'" is for math, not chat
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ConfigError("the prompt is empty")
            question, prompt_obj = prompt, Prompt.chat(prompt, system=system_prompt)
        elif isinstance(prompt, Prompt):
            prompt_obj = prompt
            users = [m.content for m in prompt.messages if m.role == "user"]
            question = users[-1] if users else (prompt.text or "")
        else:
            raise ConfigError(f"prompt must be a string or a Prompt, got {type(prompt).__name__}")
        system = next((m.content for m in prompt_obj.messages if m.role == "system"), None)
        ctx = RunContext(MeteredLM(lm, ledger), prompt_obj, question, ledger.budget, seed,
                         self.equivalence, self.name, self.options_dict(), placeholder=placeholder_in(system))
        if mode != "math":
            ctx.equivalence = TextEquivalence()
            ctx.free_form = FreeFormAnswers(mode, ctx.lm, question, ctx.notes)
        return ctx


_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes})


def _asdict(obj: Any) -> Any:
    """``dataclasses.asdict``, with its values of atomic types taken as they are rather than
    through ``copy.deepcopy`` (which returns them unchanged, at a cost: every run records its
    options). The same result otherwise, branch for branch."""
    if type(obj) in _ATOMIC:
        return obj
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _asdict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*[_asdict(v) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)(_asdict(v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((_asdict(k), _asdict(v)) for k, v in obj.items())
    return copy.deepcopy(obj)


def server_warnings(trace: Sequence[CallRecord]) -> list[str]:
    """What a user must see of the servers' misbehaviour in a run, once each (the per-call trace
    has the detail): overruns, dropped extra choices, estimated usage, billed failures."""
    out = []
    for record in trace:
        if record.overrun.calls:
            out.append("the server generated more than was reserved (extra choices or ignored max_tokens): "
                       "charged, and counted as the server's overrun in spent.server_overrun")
        if record.usage.estimated:
            out.append("the server did not report usage for some calls: their tokens are upper bounds (estimated)")
        if record.error is not None and (record.usage.input_tokens or record.usage.output_tokens):
            out.append("some failed requests may have been billed by the server: charged "
                       "(see the trace)")
        out.extend(n for n in record.notes if "kept the first" in n)
    return out


def check_budget_can_bind(budget: Budget, lm: Backend, algorithm: Algorithm | None = None) -> None:
    """A dollar limit on a model with no price would never bind, nor would a budget of tool calls
    alone on an algorithm that makes none: refuse them up front."""
    if budget.usd is not None and lm.price.free:
        raise BudgetError(
            f"a dollar budget cannot limit {lm.model!r}: it has no price (pass --price IN,OUT, "
            "or set one in a price table)"
        )
    if algorithm is not None and not algorithm.uses_tools and set(budget.limits()) == {"tool_calls"}:
        raise BudgetError(
            f"a budget of tool calls alone cannot limit {algorithm.name}: it makes no tool calls "
            "(add gen, tokens, usd or seconds)"
        )


async def sample_batches(ctx: RunContext, opts: SamplingOptions, stopping: StopRule | None = None,
                         seen: Callable[[], Sequence[Candidate]] | None = None,
                         room: Callable[[], int | None] | None = None) -> AsyncIterator[list[Candidate]]:
    """Draw candidates in calls of as many samples as the budget allows, until it refuses.

    One call carries many samples (``n``), never one call per sample: the backend batches them.
    With a stopping rule, calls are the rule's rounds, and after each one (once the caller has
    taken the batch in) the rule sees ``seen()``, the caller's candidates so far, and may end the
    loop (``ctx.stop_reason``) or set a per-sample cut for the next round. Under a deadline, a
    round is not started when the token rate seen so far says it would end after the deadline,
    and a round cut at the deadline ends the loop (``stop_reason`` "deadline"). A backend failure
    ends the loop (recorded with ``ctx.fail``) and keeps what was drawn. ``room()``, where given,
    is how many more samples the caller can use (None: any number), asked before each call: no
    call asks for more, and at 0 the loop ends (the caller says why).
    """
    caps = ctx.lm.backend.capabilities
    if stopping is not None:
        stopping, note = stopping.for_backend(caps)
        if note:
            ctx.notes.append(note)
    pace = _Pace()
    cut = None
    call = checked = 0
    while True:
        left = ctx.ledger.remaining().generations
        if left is not None and left < 1:
            ctx.ledger.exhausted_reason = ctx.ledger.exhausted_reason or "generations: none left"
            return
        n = left if left is not None else (opts.batch_size or DEFAULT_BATCH)
        if opts.batch_size is not None:
            n = min(n, opts.batch_size)
        if stopping is not None:
            n = min(left if left is not None else n, stopping.rounds.size(call))
        usable = room() if room is not None else None
        if usable is not None:
            if usable < 1:
                return
            n = min(n, usable)
        if call and pace.would_overrun(n, ctx.ledger.seconds_left()):
            ctx.stop_reason = "deadline"
            ctx.notes.append(f"a round of {n} more samples would have ended after the deadline "
                             f"(at {pace.rate():.0f} tokens/s): not started")
            return
        params = SamplingParams(
            n=n,
            max_tokens=opts.max_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            stop=opts.stop,
            seed=None if ctx.seed is None else ctx.seed + _SEED_STRIDE * call,
            logprobs=opts.logprobs and caps.logprobs,
            top_logprobs=max(opts.top_logprobs, stopping.top_logprobs if stopping else 0) if caps.logprobs else 0,
            cut=cut,
        )
        try:
            completion = await ctx.lm.generate(ctx.prompt, params, min_tokens=opts.min_tokens)
        except BudgetExhausted:
            return
        except BackendError as exc:  # what earlier calls drew stays: the run ends with it, flagged
            ctx.fail(exc)
            return
        call += 1
        pace.add(completion)
        if cut is not None and not caps.cut:  # the metered layer cut samples after drawing them: say so
            cut_note = cut_afterwards_note(ctx.lm.backend.name)
            if cut_note in completion.notes and cut_note not in ctx.notes:
                ctx.notes.append(cut_note)
        batch = ctx.candidates(completion.samples)
        if ctx.free_form is not None and ctx.free_form.judged:  # the same-answer judge, before anyone votes
            batch = await ctx.free_form.cluster(batch, seen() if seen is not None else ())
        yield batch
        if completion.error is not None:
            ctx.fail(completion.error)
            return
        if any(s.finish_reason == "deadline" for s in completion.samples):
            ctx.stop_reason = "deadline"
            return
        if not completion.samples:
            return
        if stopping is not None:
            so_far = seen() if seen is not None else ()
            view = Seen(so_far, checked, ctx.equivalence, ctx.notes)
            reason = stopping.decide(view)
            checked = len(so_far)
            if reason is not None:
                ctx.stop_reason = reason
                return
            cut = stopping.cut(view)


@dataclass(slots=True)
class _Pace:
    """The output rate and sample length seen so far in a run, to tell whether a round fits
    before the deadline: a round of n samples is taken to cost n times the longest sample seen,
    at the run's overall output rate so far (its calls' tokens over their wall time)."""

    tokens: int = 0
    seconds: float = 0.0
    longest: int = 0

    def add(self, completion: Completion) -> None:
        self.tokens += completion.usage.output_tokens
        self.seconds += completion.latency_s
        self.longest = max([self.longest, *(s.output_tokens for s in completion.samples)])

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf

    def would_overrun(self, n: int, seconds_left: float | None) -> bool:
        if seconds_left is None or not self.tokens:
            return False
        return n * self.longest / self.rate() > seconds_left
