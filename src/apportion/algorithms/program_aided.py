"""Program-aided answers (PAL, Gao et al. 2022): the model writes a short Python program that
prints the answer; the program, not the model, does the arithmetic.

Each sampled reply's program (its last ```python block, else its last plain ``` block, else the
whole reply) is run in the sandbox (``tools/sandbox.py``: separate process, wall-time, CPU,
memory and output limits). The last line it prints is the candidate's answer, normalised like any
other; a program that fails (an error, a timeout, a memory or output bomb) or prints nothing gives
no answer. The answer is the majority vote over the programs' answers.

Budget meaning: one generation per program sampled, one tool call per program run. A reply that
holds no code, or code that does not compile, is not run and costs no tool call. Programs are
drawn no faster than tool calls remain (``sample_batches``' ``room``): a program that cannot be run
is a generation thrown away, so ``gen=8,tool_calls=4`` draws 4 programs at once, and draws again
only for replies that held no program, while generations last. A budget of tool calls alone (no
other limit here or in a parent ledger) draws exactly one program per tool call, once: nothing else
would end the redrawing. Where tool calls run out all the same (a parent ledger's, or the
deadline), the programs already drawn are not run, carry no answer, and the notes say how many.
Tokens, dollars and seconds bind the samples as usual; a program's wall-time limit is cut to the
time the run has left.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions, sample_batches
from apportion.algorithms.stopping import StopRule
from apportion.algorithms.voting import tally
from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import extract_answer
from apportion.answers.normalize import normalize_answer, numeric_value
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result
from apportion.tools.metered import MeteredSandbox
from apportion.tools.sandbox import SandboxError, SandboxLimits

PROGRAM_SYSTEM_PROMPT = (
    "Solve the problem by writing a short Python program that computes the answer and prints only "
    "the final answer. Reply with the program in a ```python code block."
)
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3"}
# A printed line is an answer as it stands unless it carries an explicit marker ("Answer: 5") or a
# label before a number ("The result is: 19", "Total = 42"); a bare last-number guess would turn
# "[1, 2]" into "2".
_MARKERS = {"boxed", "hashes", "answer_is", "answer_colon"}
_LABEL_END = re.compile(r":|=|\b(?:is|are|equals)\b")


@dataclass(frozen=True, slots=True)
class ProgramAidedOptions:
    sampling: SamplingOptions = field(default_factory=lambda: SamplingOptions(system_prompt=PROGRAM_SYSTEM_PROMPT))
    time_limit_s: float = 5.0
    """Wall time of one program (its CPU time too), cut to what the run's deadline leaves."""
    memory_mb: int = 512
    """Address space of the program's interpreter (Python alone takes about 30 MB)."""
    output_bytes: int = 64_000
    concurrency: int | None = None
    """Programs run at once; None: one per CPU core."""
    stopping: StopRule | None = None
    """Sample in the rule's rounds (each round's programs run before the rule looks)."""

    def __post_init__(self) -> None:
        self.limits()
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")

    def limits(self) -> SandboxLimits:
        return SandboxLimits(wall_s=self.time_limit_s, memory_mb=self.memory_mb, output_bytes=self.output_bytes)


@dataclass(slots=True)
class _Outcomes:
    """What became of the programs, for the notes."""

    drawn: int = 0
    no_code: int = 0
    not_run: int = 0
    not_run_reason: str | None = None
    answered: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def note(self) -> str:
        ran = self.answered + sum(self.faults.values())
        parts = [f"{self.answered} printed an answer"] + [f"{n} {why}" for why, n in self.faults.most_common()]
        text = f"programs: {self.drawn} drawn, {ran} run ({', '.join(parts)})"
        if self.no_code:
            text += f", {self.no_code} without runnable code (not run, no tool call)"
        if self.not_run:
            text += f", {self.not_run} not run ({self.not_run_reason or 'refused'}): no answer"
        return text


class ProgramAided(Algorithm):
    name = "program-aided"
    uses_tools = True

    def __init__(self, options: ProgramAidedOptions | None = None, *,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or ProgramAidedOptions()

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx = self.context(lm, prompt, budget, seed, opts.sampling.system_prompt)
        await ctx.apply_prompt_mode(opts.sampling.prompt_mode)
        sandbox = MeteredSandbox(ctx.ledger, opts.limits())
        gate = asyncio.Semaphore(opts.concurrency or os.cpu_count() or 1)
        outcomes = _Outcomes()
        candidates: list[Candidate] = list(prior)
        rule = opts.stopping

        def current(final: bool) -> Result:
            t = tally(candidates, ctx.equivalence, rule.vote_weights(candidates) if rule else None)
            response = candidates[t.winner_index].text if t.winner_index is not None else None
            return ctx.result(answer=t.winner, response=response, candidates=t.candidates,
                              distribution=t.distribution, final=final)

        only_tools = not _samples_bounded(ctx.ledger)

        def room() -> int | None:
            if ctx.error is not None:  # the sandbox itself failed: more programs would fail alike
                return 0
            left = ctx.ledger.remaining().tool_calls
            if only_tools and left is not None:  # else replies without code would be redrawn forever
                left = min(left, (ctx.budget.tool_calls or 0) - outcomes.drawn)
            return left

        async for batch in sample_batches(ctx, opts.sampling, rule, lambda: candidates, room):
            candidates.extend(await asyncio.gather(*(_answer(c, sandbox, gate, outcomes, ctx) for c in batch)))
            yield current(final=False)
        if ctx.ledger.remaining().tool_calls == 0:
            ctx.ledger.exhausted_reason = ctx.ledger.exhausted_reason or "tool_calls: none left"
        if outcomes.drawn:
            ctx.notes.append(outcomes.note())
        yield current(final=True)


async def _answer(candidate: Candidate, sandbox: MeteredSandbox, gate: asyncio.Semaphore,
                  outcomes: _Outcomes, ctx: RunContext) -> Candidate:
    """The candidate with its program's answer (None unless the program ran and printed one)."""
    unanswered = replace(candidate, answer=None, raw_answer=None, extraction=None)
    outcomes.drawn += 1
    if candidate.finish_reason == "cut":  # abandoned mid-thought by a confidence rule: not a program
        outcomes.no_code += 1
        return unanswered
    code = extract_program(candidate.text)
    if code is None:
        outcomes.no_code += 1
        return unanswered
    async with gate:
        try:
            run = await sandbox.run(code)
        except SandboxError as exc:
            ctx.fail(exc)
            outcomes.faults["could not be started"] += 1
            return unanswered
    if run is None:
        outcomes.not_run += 1
        outcomes.not_run_reason = sandbox.ledger.exhausted_reason
        return unanswered
    if not run.ok:
        outcomes.faults[_fault_kind(run.fault)] += 1
        return unanswered
    answer, raw = program_answer(run.stdout)
    if answer is None:
        outcomes.faults["printed nothing"] += 1
        return unanswered
    outcomes.answered += 1
    return replace(candidate, answer=answer, raw_answer=raw, extraction="program")


def _samples_bounded(ledger: Ledger) -> bool:
    """Whether anything but tool calls limits the samples (along the parent chain)."""
    node: Ledger | None = ledger
    while node is not None:
        if set(node.budget.limits()) - {"tool_calls"}:
            return True
        node = node.parent
    return False


def extract_program(text: str) -> str | None:
    """The program in a reply: its last ```python block, else its last untagged ``` block (an
    unclosed block runs to the end of the reply), else the whole reply; None when that does not
    compile, since running it would spend a tool call on a certain SyntaxError."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    tagged = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    plain = [code for tag, code in blocks if not tag]
    if tagged or plain:
        code = (tagged or plain)[-1]
    elif blocks:  # only blocks in other languages (an "output" block): no program
        return None
    else:
        code = text
    if not code.strip():
        return None
    try:
        compile(code, "main.py", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return code


def program_answer(stdout: str) -> tuple[str | None, str | None]:
    """(normalised answer, the line as printed) from a program's output: its last non-empty line."""
    last = next((line.strip() for line in reversed(stdout.splitlines()) if line.strip()), None)
    if last is None:
        return None, None
    found = extract_answer(last)
    if found is not None and found.method in _MARKERS:
        return normalize_answer(found.text), found.text
    tail = _LABEL_END.split(last)[-1].strip()
    raw = tail if tail and tail != last and numeric_value(normalize_answer(tail)) is not None else last
    return normalize_answer(raw), raw


def _fault_kind(fault: str | None) -> str:
    """A fault without its details, so that the notes count alike faults together."""
    if fault is None:
        return "failed"
    return "exited with an error" if fault.startswith("exit ") else fault
