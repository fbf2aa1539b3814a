"""Cascades: ask the cheap model first, and a dearer one only where the cheap one is unsure.

Each model, cheapest first, draws its samples in one batched call (``n = k``). Its confidence is
the share of its samples that carry the plurality answer (samples with no answer count against
it), or, with ``confidence="vote-logprob"``, that share times the geometric-mean token probability
of the plurality's samples. Below the model's threshold the question goes to the next model.
Thresholds are meant to be chosen from data (``allocate.cascade_choice``), never on the
questions they are evaluated on.

The answer is the vote of the last model that drew samples, not a vote pooled over all models.
A question is escalated precisely because the cheaper model's samples disagree; pooling would
let those samples, judged unreliable on this very question, break the dearer model's close
votes. Measured on the escalated questions of 100 MAWPS SingleOp questions (SmolLM2-135M, then
Qwen2.5-Coder-0.5B; 4+4, 2+4 and 4+8 samples; vote thresholds 0.25 to 1; 10 orders): the last
model's vote was right 78% of the time against 72% pooled at 4+4, ahead or level in 11 of the 12
settings and behind by 0.3 points in the twelfth.

Budget: every call goes through the one ledger, each model's through its own backend and price,
so a dollar budget is exact across models. Escalation draws what the ledger still allows (fewer
samples, or none: then the cheaper model's vote stands). Candidates record the model that drew
them; a run resumed with ``prior`` candidates (a batch allocator escalating between rounds) counts
each model's own towards its sample count.

In a batch (``CascadePolicy``), escalation is decided at the round barrier across all prompts:
the least confident prompts are escalated first, as far as the total budget goes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions, check_budget_can_bind, sample_batches
from apportion.algorithms.voting import Tally, tally
from apportion.allocate.engine import Batch, Grant, Policy, PromptState
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt
from apportion.lm.metered import MeteredLM
from apportion.result import Candidate, Result

CONFIDENCES = ("vote", "vote-logprob")


def confidence(t: Tally, kind: str = "vote") -> float:
    """How sure a model's vote is, in [0, 1] (the module docstring); 0 without an answer."""
    if kind not in CONFIDENCES:
        raise ConfigError(f"unknown confidence {kind!r}; known: {', '.join(CONFIDENCES)}")
    if t.winner_index is None or not t.candidates:
        return 0.0
    group = t.groups[t.winner_index]
    winners = [c for c, g in zip(t.candidates, t.groups) if g == group]
    share = len(winners) / len(t.candidates)
    if kind == "vote":
        return share
    logprobs = [c.mean_logprob for c in winners if c.mean_logprob is not None]
    return share * math.exp(math.fsum(logprobs) / len(logprobs)) if logprobs else share


@dataclass(frozen=True, slots=True)
class CascadeOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    samples: tuple[int | None, ...] = ()
    """Samples per model, cheapest first; a missing or None entry (the last model's only): as
    many as the budget allows."""
    thresholds: tuple[float, ...] = ()
    """Escalate from model i when its confidence is below ``thresholds[i]`` (one per model but
    the last)."""
    confidence: str = "vote"

    def __post_init__(self) -> None:
        if any(k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1) for k in self.samples):
            raise ConfigError(f"cascade samples must be whole numbers >= 1, got {self.samples}")
        if any(not (isinstance(t, (int, float)) and 0 <= t <= 1) for t in self.thresholds):
            raise ConfigError(f"cascade thresholds must lie in [0, 1], got {self.thresholds}")
        if self.confidence not in CONFIDENCES:
            raise ConfigError(f"unknown confidence {self.confidence!r}; known: {', '.join(CONFIDENCES)}")


class Cascade(Algorithm):
    """``run(lm, ...)`` starts at ``lm`` and escalates to ``later``, in order."""

    name = "cascade"

    def __init__(self, later: Sequence[Backend] = (), options: CascadeOptions | None = None, *,
                 equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.later = tuple(later)
        self.options = options or CascadeOptions()
        stages = 1 + len(self.later)
        if len(self.options.thresholds) != stages - 1:
            raise ConfigError(f"a cascade of {stages} model(s) needs {stages - 1} threshold(s), "
                              f"got {len(self.options.thresholds)}")
        if any(k is None for k in self.options.samples[: stages - 1]) or len(self.options.samples) < stages - 1:
            raise ConfigError("every model of a cascade but the last needs a sample count")

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        stages = (lm, *self.later)
        names = [b.model for b in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"the models of a cascade must report distinct names, got {names}")
        ctx = self.context(lm, prompt, budget, seed, opts.sampling.system_prompt)
        for backend in self.later:
            check_budget_can_bind(ctx.ledger.budget, backend)
        await ctx.apply_prompt_mode(opts.sampling.prompt_mode)
        candidates: list[Candidate] = list(prior)
        log: list[dict[str, Any]] = []
        ctx.options["stages"] = log
        contexts = [ctx] + [replace(ctx, lm=MeteredLM(b, ctx.ledger)) for b in self.later]

        def current(final: bool) -> Result:
            return _result(contexts, candidates, ctx, final)

        for i, (stage, sctx) in enumerate(zip(stages, contexts)):
            want = opts.samples[i] if i < len(opts.samples) else None
            model = stage.model

            def room(model: str = model, want: int | None = want) -> int | None:
                return None if want is None else want - sum(c.model == model for c in candidates)

            async for batch in sample_batches(sctx, opts.sampling, room=room):
                candidates.extend(batch)
                yield current(False)
            ctx.error = ctx.error or sctx.error
            own = [c for c in candidates if c.model == model]
            sure = confidence(tally(own, ctx.equivalence), opts.confidence)
            entry: dict[str, Any] = {"model": model, "samples": len(own), "confidence": round(sure, 6)}
            log.append(entry)
            if ctx.error is not None or not own or i == len(stages) - 1:
                break  # a failure, or a budget that refused this model: the last vote stands
            entry["threshold"] = opts.thresholds[i]
            entry["escalated"] = sure < opts.thresholds[i]
            if not entry["escalated"]:
                ctx.stop_reason = "confident"
                break
        yield current(True)


def _result(contexts: Sequence[RunContext], candidates: Sequence[Candidate], main: RunContext,
            final: bool) -> Result:
    """The vote of the last model that drew, with every candidate (each voted within its model)."""
    by_model = {x.lm.backend.model: x for x in contexts}
    deciding = candidates[-1].model if candidates else None
    ctx = by_model.get(deciding or "", main)
    voted: list[Candidate] = list(candidates)
    result_tally: Tally | None = None
    for model in dict.fromkeys(c.model for c in candidates):
        positions = [i for i, c in enumerate(candidates) if c.model == model]
        t = tally([candidates[i] for i in positions], main.equivalence)
        for i, c in zip(positions, t.candidates):
            voted[i] = c
        if model == deciding:
            result_tally = t
    winner = result_tally.winner if result_tally is not None else None
    response = None
    if result_tally is not None and result_tally.winner_index is not None:
        response = result_tally.candidates[result_tally.winner_index].text
    view = replace(ctx, error=main.error, stop_reason=main.stop_reason)
    result = view.result(answer=winner, response=response, candidates=voted,
                         distribution=result_tally.distribution if result_tally is not None else {}, final=final)
    # resumed on a model the budget then refused: the vote is an earlier model's, and says so
    return result if deciding is None or result.model == deciding else replace(result, model=deciding)


@dataclass
class CascadePolicy(Policy):
    """A cascade over a batch: every prompt first gets ``samples[0]`` on ``stages[0]``; then, round
    by round, the prompts whose current model is below its threshold are escalated to the next
    model, least confident first, at most ``window`` a round and only as far as the expected cost
    of each fits what the total has left (re-estimated every round from what was drawn). A prompt
    the budget refused at a model keeps its earlier vote."""

    stages: tuple[str, ...] = ()
    """Model names, cheapest first: keys of the engine's ``backends``."""
    samples: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()
    confidence: str = "vote"
    window: int = 8
    equivalence: Equivalence = field(default_factory=Equivalence)
    name: str = "cascade"
    _stage: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages or len(self.samples) != len(self.stages) or any(k < 1 for k in self.samples):
            raise ConfigError("a cascade policy needs its models and a sample count >= 1 for each")
        if len(self.thresholds) != len(self.stages) - 1 or any(not 0 <= t <= 1 for t in self.thresholds):
            raise ConfigError(f"{len(self.stages)} model(s) need {len(self.stages) - 1} threshold(s) in [0, 1]")
        if self.confidence not in CONFIDENCES or self.window < 1:
            raise ConfigError(f"confidence must be one of {', '.join(CONFIDENCES)} and window >= 1")

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "models": list(self.stages), "samples": list(self.samples),
                "thresholds": list(self.thresholds), "confidence": self.confidence, "window": self.window}

    def plan(self, batch: Batch) -> dict[int, Grant]:
        if batch.round == 0:
            for p in batch.active:
                self._stage[p.index] = 0
            return {p.index: self._grant(batch, p, 0) for p in batch.active}
        waiting: list[tuple[float, int, PromptState]] = []
        for p in batch.active:
            stage = self._stage.get(p.index, 0)
            own = self._own(batch, p, stage)
            sure = confidence(tally(own, self.equivalence), self.confidence) if own else 0.0
            if not own or stage == len(self.stages) - 1 or sure >= self.thresholds[stage]:
                p.done = True  # settled, at the last model, or refused by the budget at this one
                continue
            waiting.append((sure, p.index, p))
        waiting.sort(key=lambda w: (w[0], w[1]))
        rem, units = batch.remaining(), batch.planned_units()
        pending = dict.fromkeys(units, 0.0)
        grants: dict[int, Grant] = {}
        for _, _, p in waiting[: self.window]:
            stage = self._stage[p.index] + 1
            cost = self._expected(batch, p, stage)
            if grants and any(pending[u] + cost[u] > float(getattr(rem, u)) for u in units):
                break  # the rest wait for the next round, when real costs say whether they fit
            for u in units:
                pending[u] += cost[u]
            self._stage[p.index] = stage
            grants[p.index] = self._grant(batch, p, stage)
        return grants

    def _model(self, batch: Batch, stage: int) -> Backend:
        try:
            return batch.backends[self.stages[stage]]
        except KeyError:
            raise ConfigError(f"the cascade names model {self.stages[stage]!r}, which the batch was not given; "
                              f"known: {', '.join(batch.backends)}") from None

    def _own(self, batch: Batch, p: PromptState, stage: int) -> list[Candidate]:
        name = self._model(batch, stage).model
        return [c for c in p.candidates if c.model == name]

    def _grant(self, batch: Batch, p: PromptState, stage: int) -> Grant:
        backend = self._model(batch, stage)
        k = self.samples[stage]
        prompt = p.model_prompt_tokens.get(self.stages[stage], p.prompt_tokens)
        inp, out = k * prompt, k * batch.max_tokens  # a request per sample at worst, each paying the prompt
        worst = {"generations": float(k), "input_tokens": float(inp), "output_tokens": float(out),
                 "total_tokens": float(inp + out), "usd": float(backend.price.cost(inp, out))}
        return Grant(Budget(generations=p.spent.generations + k), "cascade", worst, self.stages[stage])

    def _expected(self, batch: Batch, p: PromptState, stage: int) -> dict[str, float]:
        """What escalating ``p`` to ``stage`` is expected to cost: its samples at the mean length
        the model's samples have had in this batch (the worst case before it has drawn any)."""
        backend = self._model(batch, stage)
        lengths = [c.output_tokens for q in batch.prompts for c in q.candidates if c.model == backend.model]
        per = math.fsum(lengths) / len(lengths) if lengths else float(batch.max_tokens)
        k = self.samples[stage]
        inp = float(p.model_prompt_tokens.get(self.stages[stage], p.prompt_tokens))
        out = k * per
        return {"generations": float(k), "input_tokens": inp, "output_tokens": out, "total_tokens": inp + out,
                "usd": float(backend.price.per_input_token()) * inp + float(backend.price.per_output_token()) * out}
