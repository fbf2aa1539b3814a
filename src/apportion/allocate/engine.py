"""One total budget over many prompts: a parent ledger, one child ledger per prompt, rounds.

A policy (``allocate.policies``) plans rounds: each round names the prompts that get more and the
new limits of their child ledgers (top-ups) and, where it decides, the algorithm. The engine runs
a round's prompts (resuming each from its earlier candidates), then asks the policy again, until
it has nothing more to give. Every call of every prompt reserves in its child and in the parent,
so the total is never exceeded, whatever the policy does.

Decisions are taken only at round barriers, from the state all prompts reached, so completion
order cannot change them. Within a round, prompts run concurrently only when the worst case of
all their calls fits what the parent has left; otherwise they run one after another in prompt
order, each taking what the ledger still allows. Either way a round's outcome does not depend on
scheduling (the backend's own answers aside). Where a prompt's round runs is an executor's choice
(``allocate.executors``): here by default, or on remote workers with the same accounting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from apportion.algorithms.base import Algorithm
from apportion.allocate.difficulty import Estimate
from apportion.allocate.executors import Executor, LocalExecutor, Work, round_caps
from apportion.batch import Item, Outcome
from apportion.budget.ledger import Ledger, Remaining
from apportion.budget.units import Budget, Price, Spend
from apportion.errors import ApportionError, ConfigError, RunFailed
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result

# Seeds of a prompt's successive rounds lie this far apart, so no round repeats an earlier one's draws.
ROUND_SEED_STRIDE = 1_000_003
PLANNED_UNITS = ("generations", "input_tokens", "output_tokens", "total_tokens", "usd", "tool_calls")


@dataclass(frozen=True, slots=True)
class Grant:
    """A prompt's limits after this round (cumulative, in its child ledger) and, if the policy
    chose one, the algorithm that spends them."""

    budget: Budget
    algorithm: str | None = None
    worst: dict[str, float] | None = None
    """The most this round can spend, per unit (None: bounded by ``budget`` itself)."""
    model: str | None = None
    """The model (a key of ``answer_batch``'s ``backends``) this round runs on; None: the batch's backend."""
    fresh: bool = False
    """Start the prompt's vote afresh: its earlier candidates (a probe of another kind) are kept in
    its spend but no longer vote."""


@dataclass
class PromptState:
    """One prompt in a batch."""

    index: int
    item: Item
    ledger: Ledger | None = None
    result: Result | None = None
    error: str | None = None
    rounds: int = 0
    done: bool = False
    algorithm: str | None = None
    estimate: Estimate | None = None
    bin: int | None = None
    prompt_tokens: int = 0
    model: str | None = None
    """The model of its last round, where a grant named one."""
    routed: str | None = None
    """"direct" where think / no-think routing answered it from its direct probe alone."""
    model_prompt_tokens: dict[str, int] = field(default_factory=dict)
    """Its prompt's tokens on each of the batch's named models (tokenizers differ)."""

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        return self.result.candidates if self.result is not None else ()

    @property
    def spent(self) -> Spend:
        return self.ledger.spend() if self.ledger is not None else Spend()

    @property
    def active(self) -> bool:
        return self.item.prompt is not None and not self.done

    def allocation(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rounds": self.rounds, "algorithm": self.algorithm, "bin": self.bin}
        if self.model is not None:
            out["model"] = self.model
        if self.routed is not None:
            out["routed"] = self.routed
        if self.estimate is not None:
            out.update(self.estimate.to_dict())
        return out


@dataclass
class Batch:
    """What a policy sees and plans with: the prompts, the parent ledger, the backend's price."""

    prompts: list[PromptState]
    ledger: Ledger
    price: Price
    max_tokens: int
    max_samples: int | None = None
    """The most samples any one prompt may draw in all (a bank's samples per question)."""
    round: int = 0
    notes: list[str] = field(default_factory=list)
    backends: dict[str, Backend] = field(default_factory=dict)
    """The named models a grant may run on (their prices price its plans)."""

    @property
    def active(self) -> list[PromptState]:
        return [p for p in self.prompts if p.active]

    def remaining(self) -> Remaining:
        return self.ledger.remaining()

    def planned_units(self) -> list[str]:
        """The parent's limited units a plan must respect (seconds bind through the deadline)."""
        return [u for u in PLANNED_UNITS if getattr(self.ledger.budget, u) is not None]

    def sample_cost(self, state: PromptState) -> dict[str, float]:
        """What one more sample of this prompt is expected to cost, per planned unit: its own
        average so far (prompt tokens included once per sample, as separate rounds resend it), or
        the prompt plus a quarter of ``max_tokens`` before it has any."""
        s = state.spent
        if s.generations:
            inp, out = s.input_tokens / s.generations, s.output_tokens / s.generations
            tools = s.tool_calls / s.generations  # a program-aided sample runs its program: samples trade against tools
        else:
            inp, out, tools = float(state.prompt_tokens), self.max_tokens / 4, 0.0
        return {"generations": 1.0, "input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                "usd": float(self.price.per_input_token()) * inp + float(self.price.per_output_token()) * out,
                "tool_calls": tools}

    def worst_case(self, state: PromptState, samples: int) -> dict[str, float]:
        """The most ``samples`` more samples of this prompt can reserve, per unit (a call per
        sample at worst, each paying the prompt)."""
        inp, out = samples * state.prompt_tokens, samples * self.max_tokens
        return {"generations": float(samples), "input_tokens": float(inp), "output_tokens": float(out),
                "total_tokens": float(inp + out), "usd": float(self.price.cost(inp, out)),
                "tool_calls": float(samples)}

    def with_samples(self, state: PromptState, extra: int, algorithm: str | None = None) -> Grant:
        """A grant of ``extra`` more samples, the parent's other limits binding."""
        drawn = state.spent.generations
        if self.max_samples is not None:
            extra = min(extra, self.max_samples - drawn)
        return Grant(Budget(generations=drawn + max(extra, 0)), algorithm, self.worst_case(state, max(extra, 0)))

    def with_share(self, state: PromptState, share: dict[str, float]) -> Grant | None:
        """A grant of ``share`` more in each planned unit (None when it rounds to nothing)."""
        s = state.spent
        limits: dict[str, Any] = {}
        used = {"generations": s.generations, "input_tokens": s.input_tokens, "output_tokens": s.output_tokens,
                "total_tokens": s.input_tokens + s.output_tokens, "usd": float(s.usd), "tool_calls": s.tool_calls}
        worst = {u: float(v) for u, v in share.items()}
        for unit, amount in share.items():
            extra = int(amount) if unit != "usd" else amount
            if unit == "tool_calls" and extra <= 0:
                # no whole tool call to give: the prompt may still answer without one, bound by the
                # parent alone (so its round runs alone: it could take every tool call left)
                worst[unit] = float("inf")
                continue
            if extra <= 0:
                return None
            limits[unit] = used[unit] + extra
        if self.max_samples is not None:
            limits["generations"] = min(limits.get("generations", self.max_samples), self.max_samples)
            if limits["generations"] <= s.generations:
                return None
        if not limits:  # only a deadline: the child runs until the parent's deadline
            seconds = self.ledger.seconds_left()
            return Grant(Budget(seconds=max(seconds or 0.0, 1e-6)))
        return Grant(Budget(**limits), None, worst)


class Policy:
    """Plans rounds. ``plan`` returns the grants of the next round; an empty dict ends the batch."""

    name = "policy"

    def plan(self, batch: Batch) -> dict[int, Grant]:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name}


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: tuple[Outcome, ...]
    spent: Spend
    budget: Budget
    policy: dict[str, Any]
    rounds: int
    notes: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """How the budget was spent: in total, per prompt, and per difficulty bin."""
        per_bin: dict[str, dict[str, float]] = {}
        prompts = []
        for o in self.outcomes:
            a = o.allocation or {}
            s = o.result.spent if o.result is not None else Spend()
            prompts.append({"line": o.item.line, "id": o.item.id, "status": o.status, **a,
                            "generations": s.generations, "tokens": s.input_tokens + s.output_tokens,
                            "usd": float(s.usd)})
            key = "none" if a.get("bin") is None else str(a["bin"])
            b = per_bin.setdefault(key, {"prompts": 0, "generations": 0, "tokens": 0, "usd": 0.0})
            b["prompts"] += 1
            b["generations"] += s.generations
            b["tokens"] += s.input_tokens + s.output_tokens
            b["usd"] += float(s.usd)
        return {"policy": self.policy, "budget": self.budget.to_dict(), "spent": self.spent.to_dict(),
                "rounds": self.rounds, "per_bin": dict(sorted(per_bin.items())), "prompts": prompts,
                "notes": list(self.notes)}


AlgorithmFactory = Callable[[str], Algorithm]


async def answer_batch(
    items: Sequence[Item],
    backend: Backend,
    total: Budget,
    policy: Policy,
    make_algorithm: AlgorithmFactory,
    *,
    algorithm: str = "self-consistency",
    max_tokens: int = 512,
    system_prompt: str | None = None,
    concurrency: int = 4,
    seed: int | None = None,
    max_samples: int | None = None,
    max_rounds: int = 1000,
    backends: Mapping[str, Backend] | None = None,
    executor: Executor | None = None,
) -> BatchResult:
    """Answer ``items`` under one ``total`` budget as ``policy`` plans; outcomes in file order.

    ``make_algorithm(name)`` builds the algorithm a grant names (``algorithm`` where it names
    none); ``max_tokens`` and ``system_prompt`` must be those the algorithms sample with (the
    engine sizes worst cases with them). ``backends`` are the named models a grant may run on
    (``Grant.model``); a grant naming none runs on ``backend``. ``executor`` runs each prompt's
    rounds (default: here, ``LocalExecutor``; ``allocate.executors`` for remote workers).
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    parent = Ledger(total)
    states = [PromptState(i, item) for i, item in enumerate(items)]
    for state in states:
        if state.item.prompt is not None:
            chat = Prompt.chat(state.item.prompt, system=system_prompt)
            state.prompt_tokens = await backend.prompt_tokens(chat)
            for name, named in (backends or {}).items():
                state.model_prompt_tokens[name] = await named.prompt_tokens(chat)
    batch = Batch(states, parent, backend.price, max_tokens, max_samples, backends=dict(backends or {}))
    limit = asyncio.Semaphore(concurrency)
    runner = executor or LocalExecutor()

    async def advance(state: PromptState, grant: Grant, round_no: int, cap: Remaining | None = None) -> None:
        assert state.item.prompt is not None
        if state.ledger is None:
            state.ledger = parent.child(grant.budget)
        else:
            state.ledger.top_up(grant.budget)
        state.algorithm = grant.algorithm or algorithm  # a grant naming none means the batch's, not the last round's
        lm = _backend_for(grant, backend, batch.backends)
        state.model = grant.model
        run_seed = None if seed is None else seed + state.item.line + ROUND_SEED_STRIDE * round_no
        try:
            async with limit:
                state.result = await runner.run(Work(make_algorithm(state.algorithm), lm, state.item.prompt,
                                                     state.ledger, run_seed,
                                                     () if grant.fresh else state.candidates, cap))
        except RunFailed as exc:  # nothing drawn this round; the attempts' spend is in the ledger
            state.result = exc.result if exc.result.candidates or state.result is None else state.result
            state.error, state.done = f"line {state.item.line}: {exc}", True
        except ApportionError as exc:
            state.error, state.done = f"line {state.item.line}: {exc}", True
        state.rounds += 1
        result = state.result
        if result is not None and (result.stop_reason is not None or result.error is not None):
            state.done = True  # a stopping rule settled it, or its backend failed: no more top-ups
            state.error = state.error or (None if result.error is None else f"line {state.item.line}: {result.error}")
        if result is not None and not result.candidates and state.spent.generations == 0:
            state.done = True  # the budget could not fit even one sample of it

    for round_no in range(max_rounds):
        batch.round = round_no
        grants = {i: g for i, g in policy.plan(batch).items()
                  if states[i].active and (g.worst is None or g.worst.get("generations", 1) > 0)}
        if not grants:
            break
        order = sorted(grants)
        if _fits_together([grants[i] for i in order], parent.remaining()):
            caps = round_caps(parent.remaining(), [grants[i].worst for i in order])
            await asyncio.gather(*(advance(states[i], grants[i], round_no, cap) for i, cap in zip(order, caps)))
        else:
            for i in order:
                await advance(states[i], grants[i], round_no)
        if parent.exhausted:
            break
    else:
        batch.notes.append(f"stopped after {max_rounds} rounds")
    outcomes = tuple(_outcome(s) for s in states)
    return BatchResult(outcomes, parent.spend(), total, policy.describe(), batch.round + 1,
                       tuple(dict.fromkeys(batch.notes)))


def _backend_for(grant: Grant, backend: Backend, named: Mapping[str, Backend]) -> Backend:
    if grant.model is None:
        return backend
    if grant.model not in named:
        raise ConfigError(f"a grant names model {grant.model!r}, which the batch was not given; "
                          f"known: {', '.join(named) or 'none'}")
    return named[grant.model]


def _fits_together(grants: Sequence[Grant], rem: Remaining) -> bool:
    """Whether every grant's worst case, summed, fits what the parent has left in every unit."""
    for unit in PLANNED_UNITS:
        left = getattr(rem, unit)
        if left is None:
            continue
        need = Fraction(0)
        for g in grants:
            if g.worst is None or unit not in g.worst:
                if getattr(g.budget, unit) is None:
                    return False  # unbounded in a unit the parent limits: cannot be sure
                continue
            need += Fraction(g.worst[unit])
        if need > left:
            return False
    return True


def _outcome(state: PromptState) -> Outcome:
    item, result = state.item, state.result
    if item.error is not None or item.prompt is None:
        return Outcome(item, None, item.error or "no prompt")
    return Outcome(item, result, state.error, allocation=state.allocation())

