"""Particle filtering and particle Gibbs over steps with a process reward (Puri et al. 2025).

Particle filtering. N particles are searched at once. Each search step extends every live
particle by one step, all in one round of requests (particles with the same steps, the copies
resampling made, share one request of n = their number; the first step is one request of n=N),
and scores the new prefixes in one call to the process scorer. A particle's weight is its
aggregated process reward r (``aggregation``, default "last": the PRM's score of the newest
prefix, which rates the whole prefix) mapped by ``weighting``:

- "logit" (default; Puri et al.'s choice): softmax of logit(r) / T over the particles, i.e. w is
  proportional to (r / (1 - r)) ** (1 / T), with r clipped to [1e-7, 1 - 1e-7];
- "score": w proportional to r ** (1 / T) (at T = 1, the score itself as a likelihood);

with T = ``temperature``; a prefix the scorer could not score weighs 0. As in Puri et al. a weight
is recomputed from each new score, not multiplied over the steps since the last resampling: the
PRM's score of a prefix already judges all of it, and an absolute weight keeps particles,
their copies and finished particles comparable. When the effective sample size ESS =
(sum w)^2 / sum w^2 of the live particles falls below ``ess_threshold`` times their number (1.0:
resample every step, as Puri et al. do; 0: never), they are resampled, ``"multinomial"`` or
``"systematic"`` (``resampling``; systematic by default: the same expected copies with less
variance), to as many particles as were live. Particles that finish leave the live set as
candidates and are never drawn again (Puri et al. leave them in the pool; here a finished
particle is never revived). The search ends when no particle is live (every path ends by
``StepOptions.max_steps`` at the latest) or when the budget refuses a request or the scoring;
particles still live then end as "budget" candidates. The answer (``answer``): "best", the
finished particle of highest weight (the highest aggregated score: the map is increasing) among
those the model ended with an answer, else among all with an answer; "weighted-vote", the answer
whose particles hold the most normalised weight. Randomness comes from ``random.Random(seed)``
(the run's seed), so a seeded run is reproducible.

Particle Gibbs. ``sweeps`` particle filters run one after another. The first is plain particle
filtering; each later one is a conditional particle filter given a reference particle, drawn by
weight from the previous sweep's finished particles (its reference among them). At every search
step t before the reference's last, the reference's first t steps join the live particles in
resampling, weighed by their score at step t (never by the reference's final weight), and a
particle drawn as a copy of it continues from that prefix as a new particle; the reference
itself is never extended. The answer considers the finished particles of every sweep.

Budget meaning: ``--budget N`` (generations) is N: particle filtering runs N particles and at
most N finish, each one generation (``algorithms/steps.py``: every particle holds its generation
from the moment it is asked for). Resampling keeps the number of live particles, so it neither
takes nor gives back a generation: the hold of a particle not drawn passes to a copy of one drawn
(``StepSearch.expand`` sees every copy as a path with its own hold, asking one child of each), and
no hold goes back to the ledger to be taken again, where a ledger shared with other prompts
could take it in between. Particle Gibbs splits N across its sweeps as evenly as possible,
larger shares first (N=7, 2 sweeps: 4 then 3); a sweep runs its share of new particles, and the
reference beside them costs nothing: it was paid for (and counted as a candidate) in the sweep
that made it, and it is neither extended nor scored again. A sweep whose share is 0 (N below
``sweeps``) is not run. Steps are continuations: charged in tokens, dollars and seconds, never
generations, and so are the process scorer's calls (as scoring). With no generation limit,
``width`` is N (default 8). Tokens, dollars and the deadline bound every request; a search step
whose requests the budget cuts short ends the search. Round trips: one round of step requests
plus one of scoring per search step.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self

from apportion.algorithms.base import Algorithm, RunContext, SamplingOptions
from apportion.algorithms.steps import (
    ROOT,
    Choice,
    Path,
    SearchOptions,
    StepOptions,
    StepSearch,
    choose,
    search_result,
    split,
    start_search,
    step_sampling,
)
from apportion.answers.equivalence import Equivalence
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend, Prompt
from apportion.result import Candidate, Result
from apportion.reward.process import AGGREGATIONS, ProcessScorer

RESAMPLING = ("multinomial", "systematic")
WEIGHTINGS = ("logit", "score")
ANSWERS = ("best", "weighted-vote")
# Scores of exactly 0 or 1 have infinite logits: clipped as Puri et al. clip them.
_CLIP = 1e-7


# -- weights and resampling (pure functions) --------------------------------------------------------


def weigh(scores: Sequence[float | None], weighting: str = "logit", temperature: float = 1.0) -> list[float | None]:
    """The normalised weights (summing to 1) of particles with these aggregated scores; a None
    score stays None (no weight). Where no particle has a positive weight, those with a score
    weigh the same."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    logs: list[float | None] = []
    for r in scores:
        if r is None:
            logs.append(None)
        elif weighting == "logit":
            c = min(max(r, _CLIP), 1.0 - _CLIP)
            logs.append(math.log(c / (1.0 - c)) / temperature)
        else:
            logs.append(math.log(r) / temperature if r > 0 else -math.inf)
    finite = [x for x in logs if x is not None and x > -math.inf]
    if not finite:
        scored = sum(1 for x in logs if x is not None)
        return [None if x is None else 1.0 / scored for x in logs]
    top = max(finite)  # shifted by the largest, so that no weight overflows
    raw = [None if x is None else math.exp(x - top) for x in logs]
    total = math.fsum(w for w in raw if w is not None)
    return [None if w is None else w / total for w in raw]


def effective_sample_size(weights: Sequence[float | None]) -> float:
    """(sum w)^2 / sum w^2 (None weighs 0): the number of equally weighted particles these are
    worth, from 1 (one holds all the weight) to their number (all equal); 0 with no weight."""
    ws = [w or 0.0 for w in weights]
    squares = math.fsum(w * w for w in ws)
    return math.fsum(ws) ** 2 / squares if squares > 0 else 0.0


def should_resample(weights: Sequence[float | None], threshold: float) -> bool:
    """Whether the ESS fell below ``threshold`` times the number of particles (1.0: always).
    Never where no particle has a weight: there is nothing to tell them apart by."""
    if not any(w for w in weights):
        return False
    return threshold >= 1.0 or effective_sample_size(weights) < threshold * len(weights)


def _cumulative(weights: Sequence[float | None]) -> list[float]:
    ws = [max(w or 0.0, 0.0) for w in weights]
    if not any(ws):
        ws = [1.0] * len(ws)  # nothing to tell them apart: every particle alike
    return list(itertools.accumulate(ws))


def multinomial(weights: Sequence[float | None], count: int, rng: random.Random) -> list[int]:
    """``count`` ancestors drawn independently with chances proportional to ``weights``
    (sorted, so that copies of one particle sit together)."""
    if not weights or count < 1:
        return []
    cum = _cumulative(weights)
    return sorted(min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1) for _ in range(count))


def systematic(weights: Sequence[float | None], count: int, rng: random.Random) -> list[int]:
    """``count`` ancestors by systematic resampling: one uniform offset u in [0, 1/count), and
    particle i is drawn for each of u, u + 1/count, ... that falls in its share of [0, 1). Each
    particle gets floor or ceil of count * its normalised weight copies."""
    if not weights or count < 1:
        return []
    cum = _cumulative(weights)
    total, u = cum[-1], rng.random() / count
    return [min(bisect.bisect_right(cum, (u + k / count) * total), len(cum) - 1) for k in range(count)]


def resample(weights: Sequence[float | None], count: int, rng: random.Random, method: str) -> list[int]:
    """``count`` ancestor indices into ``weights`` by ``method`` (``RESAMPLING``)."""
    if method == "multinomial":
        return multinomial(weights, count, rng)
    if method == "systematic":
        return systematic(weights, count, rng)
    raise ConfigError(f"resampling must be one of {RESAMPLING}, got {method!r}")


# -- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParticleFilteringOptions:
    """Particle filtering's settings (see the module's docstring)."""

    sampling: SamplingOptions = field(default_factory=step_sampling)
    """``max_tokens`` bounds a whole path's output tokens; the system prompt asks for steps."""
    steps: StepOptions = field(default_factory=StepOptions)
    width: int | None = None
    """N where the budget sets no generation limit (default 8); under one, at most N of it."""
    aggregation: str = "last"
    """How a particle's step scores make the score it is weighed by (``reward.process.AGGREGATIONS``)."""
    weighting: str = "logit"
    """How a score becomes a weight: "logit" (softmax of logit(r) / T) or "score" (r ** (1 / T))."""
    temperature: float = 1.0
    """T: below 1 sharpens the weights towards the best particle, above 1 flattens them."""
    resampling: str = "systematic"
    """"multinomial" or "systematic"."""
    ess_threshold: float = 0.5
    """Resample when the ESS falls below this fraction of the live particles (1.0: every step, 0: never)."""
    answer: str = "best"
    """"best" (highest weight) or "weighted-vote" (the answer with the most weight)."""

    def __post_init__(self) -> None:
        if self.width is not None and self.width < 1:
            raise ConfigError(f"width must be >= 1, got {self.width}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}")
        if self.resampling not in RESAMPLING:
            raise ConfigError(f"resampling must be one of {RESAMPLING}, got {self.resampling!r}")
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ConfigError(f"ess_threshold must be between 0 and 1, got {self.ess_threshold}")
        if self.answer not in ANSWERS:
            raise ConfigError(f"answer must be one of {ANSWERS}, got {self.answer!r}")

    @classmethod
    def from_search(cls, search: SearchOptions, **options: Any) -> Self:
        """These options from a step-wise search's shared ones (the registry's): its sampling,
        steps, width and aggregation, and ``vote`` as the weighted vote; ``beam_width`` has no
        use here. ``options`` set the particle settings."""
        answer = "weighted-vote" if search.vote else "best"
        return cls(**{"sampling": search.sampling, "steps": search.steps, "width": search.width,
                      "aggregation": search.aggregation, "answer": answer, **options})


@dataclass(frozen=True, slots=True)
class ParticleGibbsOptions(ParticleFilteringOptions):
    """Particle Gibbs's settings: particle filtering's and the number of sweeps."""

    sweeps: int = 2
    """Particle filters run in turn (the first plain, the others given a reference particle)."""

    def __post_init__(self) -> None:
        ParticleFilteringOptions.__post_init__(self)  # zero-argument super() fails in a slots dataclass
        if self.sweeps < 1:
            raise ConfigError(f"sweeps must be >= 1, got {self.sweeps}")


# -- the algorithms --------------------------------------------------------------------------------


class ParticleFiltering(Algorithm):
    name = "particle-filtering"

    def __init__(self, options: ParticleFilteringOptions | None = None, *,
                 process_scorer: ProcessScorer | None = None, equivalence: Equivalence | None = None) -> None:
        super().__init__(equivalence=equivalence)
        self.options = options or ParticleFilteringOptions()
        self.process_scorer = process_scorer

    def options_dict(self) -> dict[str, Any]:
        scorer = self.process_scorer.name if self.process_scorer is not None else None
        return {**super().options_dict(), "process_scorer": scorer}

    @property
    def sweeps(self) -> int:
        return 1

    async def stream(self, lm: Backend, prompt: str | Prompt, budget: Budget | Ledger, *,
                     seed: int | None = None, prior: Sequence[Candidate] = ()) -> AsyncIterator[Result]:
        opts = self.options
        ctx, search = await start_search(self, lm, prompt, budget, seed, opts.sampling, opts.steps,
                                         self.process_scorer, opts.aggregation, opts.width)
        rng = random.Random(ctx.seed)
        # Every live prefix seen, by its steps: a reference's prefixes, with their tokens and scores.
        trail: dict[tuple[str, ...], Path] = {}
        reference: Path | None = None
        shares = split(search.width, self.sweeps) if search.width else []
        try:
            for sweep, share in enumerate(shares):
                particles = min(share, search.room)
                if particles < 1 or search.stopped:
                    break
                first = len(search.finished)
                async for _ in self._sweep(search, particles, reference, trail, rng):
                    yield self._result(ctx, search, prior, final=False)
                pool = search.finished[first:] + ([reference] if reference is not None else [])
                if sweep + 1 < len(shares) and pool:
                    reference = pool[resample(self._weights(pool), 1, rng, "multinomial")[0]]
        finally:
            search.close()
        yield self._result(ctx, search, prior, final=True)

    async def _sweep(self, search: StepSearch, particles: int, reference: Path | None,
                     trail: dict[tuple[str, ...], Path], rng: random.Random) -> AsyncIterator[None]:
        """One particle filter of ``particles`` new particles (given ``reference``: conditional),
        yielding after each search step; its particles end as finished paths of ``search``."""
        opts = self.options
        live: list[Path] = []
        wants: list[tuple[Path, int]] = [(ROOT, particles)]
        step = 0
        while wants and not search.stopped:
            children = await search.step(wants)
            if not any(children):  # refused: the particles keep their paths
                live = [p for p, _ in wants if p.steps]
                break
            step += 1
            live = []
            for (path, _), kids in zip(wants, children):
                if kids:
                    live.extend(c for c in kids if not c.finished)
                elif path.steps:
                    live.append(path)  # the budget cut its request short: still live, a step behind
            trail.update((p.steps, p) for p in live)
            yield None
            if not live or search.stopped:
                break
            pool = list(live)
            if reference is not None and step < len(reference.steps):
                # the reference's first `step` steps, weighed by their own score at this step
                prefix = trail.get(reference.steps[:step])
                if prefix is not None:
                    pool.append(prefix)
            weights = self._weights(pool)
            if should_resample(weights, opts.ess_threshold):
                live = [pool[i] for i in resample(weights, len(live), rng, opts.resampling)]
            wants = [(p, 1) for p in live]
        # not in a `finally`: a search cut short is closed by the caller, giving back every hold
        search.finish([p for p in live if p.steps])

    def _weights(self, paths: Sequence[Path]) -> list[float | None]:
        opts = self.options
        return weigh([p.score(opts.aggregation) for p in paths], opts.weighting, opts.temperature)

    def choice(self, candidates: Sequence[Candidate], complete: Sequence[bool], equivalence: Equivalence) -> Choice:
        """The answer of these candidates by ``answer`` (``steps.choose``'s arguments): "best" is
        ``choose``'s best score; "weighted-vote" weighs the candidates' scores as particles are
        weighed and sums the weights per answer. Planning pools several runs' candidates through
        this, so that the pool is chosen by the same rule as one run's."""
        if self.options.answer == "best":
            return choose(candidates, complete, equivalence, vote=False)
        weights = weigh([c.score for c in candidates], self.options.weighting, self.options.temperature)
        # choose's weighted vote sums scores: handing it the weights as scores makes it sum
        # those, and the candidates are given back with their own scores (and the votes it counted)
        weighted = [replace(c, score=w) for c, w in zip(candidates, weights)]
        made = choose(weighted, complete, equivalence, vote=True)
        return replace(made, candidates=tuple(c.with_votes(v.votes) for c, v in zip(candidates, made.candidates)))

    def _result(self, ctx: RunContext, search: StepSearch, prior: Sequence[Candidate], *, final: bool) -> Result:
        if self.options.answer == "best":
            return search_result(ctx, search, prior, False, final=final)
        candidates = [*prior, *(search.candidate(p) for p in search.finished)]
        complete = [True] * len(prior) + [p.by_model for p in search.finished]
        choice = self.choice(candidates, complete, ctx.equivalence)
        if final and choice.note and choice.note not in ctx.notes:
            ctx.notes.append(choice.note)
        response = choice.candidates[choice.index].text if choice.index is not None else None
        return ctx.result(answer=choice.answer, response=response, candidates=choice.candidates,
                          distribution=choice.distribution, final=final, search=search.stats(choice.index))


class ParticleGibbs(ParticleFiltering):
    name = "particle-gibbs"
    options: ParticleGibbsOptions

    def __init__(self, options: ParticleGibbsOptions | None = None, *,
                 process_scorer: ProcessScorer | None = None, equivalence: Equivalence | None = None) -> None:
        super().__init__(options or ParticleGibbsOptions(), process_scorer=process_scorer, equivalence=equivalence)

    @property
    def sweeps(self) -> int:
        return self.options.sweeps
