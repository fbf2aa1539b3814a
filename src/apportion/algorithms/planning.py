"""Planning: one generation writes a plan of distinct approaches; the rest of the budget is split
exactly among them, each spent by a base algorithm with its approach in the prompt.

The plan. The model is asked for ``approaches`` (A, default 3) distinct approaches to the
question as a numbered list ("1.", "1)", "(1)", "Approach 1:", markdown bold and indented
continuation lines are read; a dash or star list where no line is numbered). Repeats (the same
words, case and punctuation aside) count once. Fewer distinct approaches than asked: those are
used (at least one); none at all, or a plan the budget or the backend would not give: the base
algorithm runs alone on what is left, without a plan, and the result's notes say so.

The approaches. Each approach runs the base algorithm (any ``Algorithm``: self-consistency, best-of-N,
beam search, ...) on its own child ledger (``Ledger.child``) with "Use this approach: <approach>"
added to the end of the question's user message (the base's system prompt is kept). The
approaches run concurrently; every interim result of any of them yields a pooled interim result.

The answer: every approach's candidates pooled and chosen by the base's own rule: a step-wise
search's (``steps.choose``: the best aggregated score among paths the model ended, or the highest
summed score with ``vote``); scored candidates (best-of-N): the best score, or the highest summed
score where the base is weighted; otherwise the majority vote (weighted as the base's stopping rule
weighs votes). Never the length of an answer, nor which approach it came from.

Budget meaning of ``--budget N``:

- generations: the plan is one generation: it holds one while it is written and settles as one
  (its call is a "planning" call, so ``spent.planning_generations`` shows it too). The N - 1 left
  are split among the approaches with ``steps.split`` (near-equal, larger first; with fewer than
  A left, only that many approaches run, one each), and each approach spends its part as the
  base's own budget meaning says. So when the base uses all it is given, the run spends exactly
  N generations. Under ``gen=1`` there is no room for a plan beside a solution: the base runs alone.
- tokens, dollars, tool calls: the plan's call is reserved and charged first (at most
  ``plan_tokens`` out); what each limited unit has left after it, along this ledger and every one
  above, is split among the approaches the same way (whole tokens and tool calls, larger parts
  first; dollars in equal parts, each rounded down). Child ledgers reserve in this one too, so no
  approach can spend another's part, and the whole never passes the budget. Without a limit in a
  unit, the approaches share it unsplit.
- deadline: one for all: the approaches run at once, each bounded by the run's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from apportion.algorithms.base import Algorithm, RunContext
from apportion.algorithms.particle_filtering import ParticleFiltering
from apportion.algorithms.steps import choose, split
from apportion.algorithms.stopping import StopRule
from apportion.algorithms.voting import score_tally, tally
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import HELD_UNITS, Ledger, Remaining
from apportion.budget.units import Budget, Spend, to_fraction
from apportion.errors import BackendError, BudgetExhausted, ConfigError
from apportion.lm.base import Backend, Message, Prompt, SamplingParams
from apportion.result import Candidate, Result

PLAN_PROMPT = (
    "List {approaches} distinct approaches to solving the problem below, as a numbered list with one "
    "short line per approach. Do not solve the problem.\n\nProblem: {question}"
)
APPROACH_INSTRUCTION = "Use this approach: {approach}"
_ONE_GENERATION = Remaining(generations=1, input_tokens=None, output_tokens=None, total_tokens=None, usd=None,
                            seconds=None)
# The approaches' runs get seeds this far apart, so that no two draw the same samples.
_SEED_STRIDE = 104_729
_NUMBERED = re.compile(
    r"^\s*(?:[-*]\s+)?(?:\*\*|__)?\s*(?:(?:approach|method|option|strategy|idea)\s*#?\s*)?"
    r"\(?\d{1,2}\s*(?:[.):\]]|\s-|\s–)(?!\d)\s*(?P<text>.*)$", re.IGNORECASE)
_BULLET = re.compile(r"^\s*[-*•]\s+(?P<text>.*)$")


@dataclass(frozen=True, slots=True)
class PlanningOptions:
    """The plan's settings; how each approach is solved is the base algorithm's."""

    approaches: int = 3
    """A: the distinct approaches asked for."""
    plan_tokens: int = 256
    """The most tokens the plan may take."""
    plan_temperature: float = 0.7
    plan_prompt: str = PLAN_PROMPT
    """The request for the plan; ``{approaches}`` and ``{question}`` are filled in."""
    instruction: str = APPROACH_INSTRUCTION
    """What is added to the question for each approach; ``{approach}`` is filled in."""

    def __post_init__(self) -> None:
        if self.approaches < 1:
            raise ConfigError(f"approaches must be >= 1, got {self.approaches}")
        if self.plan_tokens < 1:
            raise ConfigError(f"plan_tokens must be >= 1, got {self.plan_tokens}")
        if not 0.0 <= self.plan_temperature <= 2.0:
            raise ConfigError(f"plan_temperature must be between 0 and 2, got {self.plan_temperature}")
        _check_template("plan_prompt", self.plan_prompt, "question", approaches=1, question="")
        _check_template("instruction", self.instruction, "approach", approach="")


def _check_template(name: str, template: str, needed: str, **fields: object) -> None:
    if "{" + needed + "}" not in template:
        raise ConfigError(f"{name} must hold {{{needed}}}, got {template!r}")
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{name} may hold only {', '.join('{' + f + '}' for f in fields)}: {exc!r}") from None


def parse_plan(text: str, limit: int | None = None) -> list[str]:
    """The distinct approaches of a plan, in order (at most ``limit``): its numbered items, or,
    where none is numbered, its dash or star items. An item goes on over indented lines below it."""
    for pattern in (_NUMBERED, _BULLET):
        items = _items(text, pattern)
        if items:
            break
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        key = " ".join(re.findall(r"[a-z0-9]+", item.lower()))
        if key and any(ch.isalpha() for ch in key) and key not in seen:
            seen.add(key)
            out.append(item)
    return out[:limit] if limit is not None else out


def _items(text: str, pattern: re.Pattern[str]) -> list[str]:
    items: list[list[str]] = []
    current: list[str] | None = None
    for line in text.splitlines():
        found = pattern.match(line)
        if found and (pattern is _NUMBERED or not line[:1].isspace()):  # an indented bullet goes on an item
            current = [found.group("text")]
            items.append(current)
        elif current is not None and line.strip() and line[:1].isspace():
            current.append(re.sub(r"^[-*•]\s+", "", line.strip()))
        else:
            current = None
    cleaned = (" ".join(" ".join(parts).replace("**", "").replace("__", "").split()) for parts in items)
    return [item.strip(" :-–") for item in cleaned if item.strip(" :-–")]


def with_instruction(prompt: str | Prompt, instruction: str) -> str | Prompt:
    """``prompt`` with ``instruction`` added to the end of its (last) user message."""
    if isinstance(prompt, str):
        return f"{prompt.rstrip()}\n\n{instruction}"
    if not prompt.is_chat:
        text = f"{(prompt.text or '').rstrip()}\n\n{instruction}\n"
        return Prompt(text=text, assistant_prefix=prompt.assistant_prefix)
    messages = list(prompt.messages)
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        messages.append(Message("user", instruction))
    else:
        messages[last] = Message("user", f"{messages[last].content.rstrip()}\n\n{instruction}")
    return Prompt(tuple(messages), None, prompt.assistant_prefix)


def chain_left(ledger: Ledger) -> Remaining:
    """What ``ledger`` and every ledger above it have left, unit by unit (the least of them)."""
    values: dict[str, Any] = {}
    at: Ledger | None = ledger
    while at is not None:
        left = at.remaining()
        for unit in (*HELD_UNITS, "seconds"):
            mine, theirs = getattr(left, unit), values.get(unit)
            values[unit] = mine if theirs is None else theirs if mine is None else min(mine, theirs)
        at = at.parent
    return Remaining(**values)


def split_budget(left: Remaining, parts: int) -> list[Budget]:
    """``left`` in at most ``parts`` budgets that add up to it in every limited unit (whole units
    near-equal, larger first; dollars equal, each rounded down to a float). Fewer parts where a
    unit has fewer whole units left than ``parts``; none where one has none, or the deadline has
    passed. The deadline is not split: every part gets the seconds left (a child ledger's deadline
    is its parent's anyway)."""
    if left.seconds is not None and left.seconds <= 0:
        return []
    whole = {u: getattr(left, u) for u in HELD_UNITS if u != "usd" and getattr(left, u) is not None}
    parts = min([parts, *whole.values()])
    usd = left.usd
    if parts >= 1 and usd is not None:
        share = _float_at_most(Fraction(usd) / parts)
        if share <= 0:
            parts = 0
    if parts < 1:
        return []
    splits = {u: split(v, parts) for u, v in whole.items()}
    seconds = left.seconds
    out = []
    for i in range(parts):
        limits: dict[str, Any] = {u: s[i] for u, s in splits.items()}
        if usd is not None:
            limits["usd"] = share
        if seconds is not None:
            limits["seconds"] = seconds
        out.append(Budget(**limits))
    return out


def _float_at_most(value: Fraction) -> float:
    """The largest float a ledger reads as no more than ``value`` (ledgers read a float's shortest repr)."""
    out = float(value)
    while out > 0 and to_fraction(out) > value:
        out = math.nextafter(out, 0.0)
    return out


class Planning(Algorithm):
    name = "planning"

    def __init__(self, base: Algorithm, options: PlanningOptions | None = None, *,
                 equivalence: Equivalence | None = None) -> None:
        if isinstance(base, Planning):
            raise ConfigError("planning takes a base algorithm that answers, not another planning run")
        super().__init__(equivalence=equivalence or base.equivalence)
        self.base = base
        self.options = options or PlanningOptions()

    def options_dict(self) -> dict[str, Any]:
        return {**super().options_dict(), "base": self.base.name, "base_options": self.base.options_dict()}

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        ctx = self.context(lm, prompt, budget, seed, None)
        approaches = await self._plan(ctx)
        prompts: list[str | Prompt] = [with_instruction(prompt, self.options.instruction.format(approach=a))
                                       for a in approaches] or [prompt]
        ledgers = [ctx.ledger.child(b) for b in split_budget(chain_left(ctx.ledger), len(prompts))]
        if len(ledgers) < len(prompts):
            ctx.notes.append(f"the budget left after the plan pays for {len(ledgers)} of {len(prompts)} approaches")
        latest: list[Result | None] = [None] * len(ledgers)
        # closed with this stream: a consumer that stops early stops the approaches then, not
        # whenever the event loop finalizes the merge (they would spend on meanwhile)
        async with contextlib.aclosing(_merged([self.base.stream(lm, p, led, seed=_seed(seed, i))
                                                for i, (p, led) in enumerate(zip(prompts, ledgers))])) as merged:
            async for i, result in merged:
                latest[i] = result
                yield self._pooled(ctx, prior, latest, final=False)
        self._wrap_up(ctx, ledgers, latest)
        yield self._pooled(ctx, prior, latest, final=True)

    async def _plan(self, ctx: RunContext) -> list[str]:
        """The plan's approaches (none: the base runs alone, and a note says why)."""
        opts = self.options
        gens = chain_left(ctx.ledger).generations
        if gens is not None and gens < 2:
            ctx.notes.append("no plan: the budget has no generation for one beside a solution; "
                             "the base algorithm ran without a plan")
            return []
        held = ctx.ledger.hold(_ONE_GENERATION)
        if held is None:  # another run on a shared ledger took the last generations meanwhile
            ctx.notes.append("no plan: no generation could be held for one; the base algorithm ran without a plan")
            return []
        request = Prompt.chat(opts.plan_prompt.format(approaches=opts.approaches, question=ctx.question))
        params = SamplingParams(max_tokens=opts.plan_tokens, temperature=opts.plan_temperature, seed=ctx.seed)
        try:
            completion = await ctx.lm.planning().generate(request, params, min_tokens=min(opts.plan_tokens, 16))
        except (BudgetExhausted, BackendError) as exc:
            ctx.ledger.release_hold(held)
            ctx.notes.append(f"no plan ({exc}): the base algorithm ran without a plan")
            return []
        except BaseException:
            # cancelled, or a bug: no plan was written, and the hold would stay taken on a ledger
            # that may outlive this run (a batch's)
            ctx.ledger.release_hold(held)
            raise
        ctx.ledger.settle_hold(held, Spend(generations=1))
        approaches = parse_plan(completion.samples[0].text if completion.samples else "", opts.approaches)
        if not approaches:
            ctx.notes.append("the plan held no numbered approaches: the base algorithm ran without a plan")
        else:
            listed = "; ".join(f"{i + 1}. {a}" for i, a in enumerate(approaches))
            ctx.notes.append(f"plan: {len(approaches)} of {opts.approaches} approaches asked for: {listed}")
        return approaches

    def _pooled(self, ctx: RunContext, prior: Sequence[Candidate], latest: Sequence[Result | None], *,
                final: bool) -> Result:
        candidates = [*prior, *(c for r in latest if r is not None for c in r.candidates)]
        answer, index, distribution, voted = pooled_choice(self.base, candidates, ctx.equivalence)
        response = voted[index].text if index is not None else None
        return ctx.result(answer=answer, response=response, candidates=voted, distribution=distribution, final=final)

    @staticmethod
    def _wrap_up(ctx: RunContext, ledgers: Sequence[Ledger], latest: Sequence[Result | None]) -> None:
        """The approaches' failures, stops, exhaustion and notes, as the whole run's."""
        count = len(ledgers)
        results = [r for r in latest if r is not None]
        for i, result in enumerate(latest):
            if result is None:
                continue
            if result.error is not None:
                ctx.error = ctx.error or result.error
            for note in result.notes:
                tagged = f"approach {i + 1} of {count}: {note}" if count > 1 else note
                if tagged not in ctx.notes:
                    ctx.notes.append(tagged)
        if results and all(r.stop_reason is not None for r in results):
            ctx.stop_reason = results[0].stop_reason
        spent = next((led for led in ledgers if led.exhausted), None)
        if spent is not None and ctx.ledger.exhausted_reason is None:
            ctx.ledger.exhausted_reason = spent.exhausted_reason
        if not ledgers and ctx.ledger.exhausted_reason is None:
            ctx.ledger.exhausted_reason = "the budget left after the plan pays for no approach"


def pooled_choice(base: Algorithm, candidates: Sequence[Candidate],
                  equivalence: Equivalence) -> tuple[str | None, int | None, dict[str, float], tuple[Candidate, ...]]:
    """The answer of ``candidates`` drawn by ``base`` (over any number of runs) by ``base``'s own
    rule: (answer, index of the candidate it came from, distribution, candidates with votes)."""
    options = getattr(base, "options", None)
    summed = bool(getattr(options, "weighted", False) or getattr(options, "vote", False))
    if any(c.steps is not None for c in candidates):
        complete = [c.steps is None or c.finish_reason == "stop" for c in candidates]
        if isinstance(base, ParticleFiltering):  # its weighted vote sums weights, not scores
            made = base.choice(candidates, complete, equivalence)
        else:
            made = choose(candidates, complete, equivalence, vote=summed)
        return made.answer, made.index, made.distribution, made.candidates
    if any(c.score is not None and c.answer is not None for c in candidates):
        t, _ = score_tally(candidates, equivalence, weighted=summed)
    else:
        rule = getattr(options, "stopping", None)
        t = tally(candidates, equivalence, rule.vote_weights(candidates) if isinstance(rule, StopRule) else None)
    return t.winner, t.winner_index, t.distribution, t.candidates


def _seed(seed: int | None, approach: int) -> int | None:
    return None if seed is None else seed + _SEED_STRIDE * approach


async def _merged(streams: Sequence[AsyncIterator[Result]]) -> AsyncGenerator[tuple[int, Result], None]:
    """(i, result) as each of ``streams`` yields, all of them run at once; the first error of any
    is raised (the others cancelled)."""
    queue: asyncio.Queue[tuple[int, Result | BaseException | None]] = asyncio.Queue()

    async def drain(i: int, stream: AsyncIterator[Result]) -> None:
        try:
            async for result in stream:
                await queue.put((i, result))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(drain(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
