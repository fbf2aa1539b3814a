"""its-hub's own SelfConsistency, BestOfN, BeamSearch and ParticleFiltering, pointed at the peer endpoint.

What it is given, so that the comparison is between algorithms: the same messages (our system
prompt and the question), max tokens and temperature, and for self-consistency our answer
extractor as its projection function (its default votes on whole texts, which never agree on
free-form math). BestOfN uses its-hub's own LLMJudge on the same endpoint; llama.cpp rejects
its JSON-schema response format, so that is turned off. Its tie-breaks use the global
``random`` (and particle filtering's systematic resampling numpy's), seeded per cell.

Step-wise searches. its-hub's BeamSearch and ParticleFiltering take a ``StepGeneration`` (how a
step is asked for) and a process reward model with ``ascore(prompt, responses) -> [score]``.
They get what our searches get: the system prompt our search uses (its step instruction), the
step delimiter as the stop string, at most ``max_step_tokens`` per step, ``max_steps``, the
temperature, and our process scorer (``--process-scorer``) behind its interface
(``ProcessRewardAdapter``): a response is split back into its steps at the delimiter (empty steps
dropped: its-hub keeps asking a path that ended without its stop string for more, and gets
nothing), scored by our scorer, and the step scores aggregated as ours are (``aggregation``). A
prefix our scorer leaves unscored (None: a verifier with nothing to check yet) is 0.5 to its-hub,
which needs a number in [0, 1]. The scorer's calls go to the same endpoint, so their tokens
count as the question's. What differs is its-hub's own design, reported, never adjusted: a path
ends only when a step contains its stop string ("The answer is", what our system prompt asks for)
or at ``max_steps`` (a model that stops without it is asked for empty steps until then); every
path's next step is its own request of n=1 (ours: one request of n=k per distinct prefix); its
beam search keeps ``budget / M`` paths and copies each M times (ours keeps ceil(N/M) and asks
each for M children: the same shape), and needs the budget a multiple of M; its particle
filtering resamples every step (multinomial) and keeps finished particles in the pool.
Steps of k tokens (``every_tokens``) cannot be split back out of its joined text, so are refused.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.answers.extract import read_answer
from apportion.banks import Problem
from apportion.bench.peers.endpoint import CountingBackend
from apportion.bench.peers.reply import SCORER_REQUESTS, PeerReply, PeerSearch
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import ConfigError
from apportion.lm.base import Backend
from apportion.lm.metered import MeteredLM
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.reward.process import ProcessScorer, aggregate

ALGORITHMS = {"self-consistency": "SelfConsistency", "best-of-n": "BestOfN", "beam-search": "BeamSearch",
              "particle-filtering": "ParticleFiltering"}
SEARCHES = ("beam-search", "particle-filtering")
STOP_TOKEN = "The answer is"
"""Where its-hub ends a path: a step holding this text (our system prompts ask for it)."""
UNSCORED = 0.5
_NO_LIMIT = Budget(total_tokens=10**15)  # the scorer's ledger only counts: the peer is bounded by its own budget


def available() -> str | None:
    """None when its-hub can run here, else why not."""
    try:
        import its_hub  # noqa: F401
        from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel  # noqa: F401
    except ImportError as exc:
        return f"its-hub is not installed ({exc}); pip install 'its-hub[lm]'"
    return None


def _project(text: str) -> Hashable:
    return read_answer(text or "")[0]


def needs_search(algorithm: str) -> bool:
    return algorithm in SEARCHES


def refuses(algorithm: str, budget: int, search: PeerSearch | None) -> str | None:
    """Why its-hub cannot run ``algorithm`` at ``budget`` with these settings (None: it can)."""
    if algorithm not in SEARCHES or search is None:
        return None
    settings = search.settings
    if settings.steps.every_tokens is not None:
        return "steps of k tokens cannot be split back out of the text its-hub scores (use a delimiter)"
    if algorithm == "beam-search" and budget % settings.beam_width:
        return (f"its-hub's beam search keeps budget / M paths, so the budget must be a multiple of M "
                f"(--beam-width {settings.beam_width})")
    return None


@dataclass
class _Question:
    """One question's scoring: its scorer (and prefix cache), ledger and the rounds seen."""

    scorer: ProcessScorer
    lm: MeteredLM
    rounds: int = 0
    scoring_rounds: int = 0

    def scoring_calls(self) -> int:
        return sum(1 for r in self.lm.ledger.trace if r.kind == "scorer")


class ProcessRewardAdapter:
    """its-hub's process-reward interface (``ascore(prompt, responses) -> [score]``) over our
    process scorer: each response split at ``delimiter`` into its steps (empty ones dropped),
    scored through ``backend`` (charged to a ledger per question), aggregated by ``aggregation``;
    unscored is ``UNSCORED``. Counts, per question, its rounds and those that made scorer calls."""

    def __init__(self, make_scorer: Callable[[], ProcessScorer], backend: Backend, *, delimiter: str,
                 aggregation: str) -> None:
        self._make_scorer = make_scorer
        self._backend = backend
        self.delimiter = delimiter
        self.aggregation = aggregation
        self.questions: dict[str, _Question] = {}

    def question(self, text: str) -> _Question:
        if text not in self.questions:
            self.questions[text] = _Question(self._make_scorer(), MeteredLM(self._backend, Ledger(_NO_LIMIT)))
        return self.questions[text]

    async def ascore(self, prompt: Any, responses: str | list[str]) -> float | list[float]:
        if not isinstance(prompt, str):
            raise TypeError(f"its-hub's searches pass the question as text, got {type(prompt).__name__}")
        single = isinstance(responses, str)
        texts = [responses] if isinstance(responses, str) else list(responses)
        state = self.question(prompt)
        paths = [[step for step in text.split(self.delimiter) if step.strip()] for text in texts]
        scored = [i for i, steps in enumerate(paths) if steps]
        before = state.scoring_calls()
        got = await state.scorer.score(state.lm, prompt, [paths[i] for i in scored]) if scored else []
        state.rounds += 1
        state.scoring_rounds += state.scoring_calls() > before
        out = [UNSCORED] * len(texts)
        for i, step_scores in zip(scored, got):
            value = aggregate(step_scores, self.aggregation)
            out[i] = UNSCORED if value is None else min(1.0, max(0.0, value))
        return out[0] if single else out

    def score(self, prompt: Any, responses: str | list[str]) -> float | list[float]:
        return asyncio.run(self.ascore(prompt, responses))


async def answer(algorithm: str, base_url: str, model: str, problems: Sequence[Problem], budget: int,
                 sampling: SamplingOptions, *, seed: int, concurrency: int, search: PeerSearch | None = None,
                 on_reply: Callable[[int, PeerReply], None] | None = None) -> list[PeerReply]:
    """One reply per problem, in order (each also to ``on_reply`` with its index as it comes)."""
    from its_hub import BestOfN, LLMJudge, SelfConsistency
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    if algorithm not in ALGORITHMS:
        raise ConfigError(f"its_hub has no peer for {algorithm!r}; it has: {', '.join(ALGORITHMS)}")
    adapter: ProcessRewardAdapter | None = None
    scorer_backend: CountingBackend | None = None
    system_prompt, max_tokens = sampling.system_prompt, sampling.max_tokens
    judge_lm: Any = None
    if algorithm in SEARCHES:
        if search is None:
            raise ConfigError(f"its_hub's {algorithm} needs a process scorer (--process-scorer)")
        settings = search.settings
        # the system prompt our search asks with (its step instruction), as the registry builds it
        ours = make_algorithm(algorithm, sampling, process_scorer=search.process_scorer())
        system_prompt = getattr(getattr(ours, "options", None), "sampling", sampling).system_prompt
        max_tokens = min(sampling.max_tokens, settings.steps.max_step_tokens)
        scorer_backend = CountingBackend(OpenAIHTTPBackend(HTTPOptions(base_url=base_url, model=model, max_retries=0)),
                                         problems)
        adapter = ProcessRewardAdapter(search.process_scorer, scorer_backend, delimiter=settings.steps.delimiter,
                                       aggregation=settings.aggregation)
        algo: Any = _search(algorithm, budget, settings, sampling, adapter)
    elif algorithm == "self-consistency":
        algo = SelfConsistency(consistency_space_projection_func=_project)
    else:
        judge_lm = OpenAICompatibleLanguageModel(endpoint=base_url, api_key="sk-none", model_name=model,
                                                 max_completion_tokens=64, temperature=0.0, max_tries=1)
        algo = BestOfN(orm=LLMJudge(judge_lm, response_format=None))
    # max_tries=1: a failing request is a finding to report, not something to retry for seconds.
    lm = OpenAICompatibleLanguageModel(endpoint=base_url, api_key="sk-none", model_name=model,
                                       system_prompt=system_prompt, max_completion_tokens=max_tokens,
                                       temperature=sampling.temperature, max_tries=1)
    random.seed(seed)
    _seed_numpy(seed)
    limit = asyncio.Semaphore(concurrency)

    async def one(index: int, problem: Problem) -> PeerReply:
        async with limit:
            started = time.monotonic()
            try:
                result = await algo.ainfer(lm, problem.question, budget, return_response_only=False)
            except Exception as exc:  # a peer's failure is data: reported per question, never raised
                reply = PeerReply(None, f"{type(exc).__name__}: {exc}", _figures(adapter, scorer_backend, problem),
                                  time.monotonic() - started)
            else:
                reply = PeerReply((result.the_one or {}).get("content"), None,
                                  _figures(adapter, scorer_backend, problem), time.monotonic() - started)
        if on_reply is not None:
            on_reply(index, reply)
        return reply

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(problems))))
    finally:
        for client in (lm, judge_lm):
            close = getattr(client, "close", None)
            if close is not None:
                await close()
        if scorer_backend is not None:
            await scorer_backend.aclose()


def _search(algorithm: str, budget: int, settings: Any, sampling: SamplingOptions,
            adapter: ProcessRewardAdapter) -> Any:
    from its_hub.core.algorithms.beam_search import BeamSearch
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering
    from its_hub.core.lms.step_generation import StepGeneration

    steps = StepGeneration(max_steps=settings.steps.max_steps, step_token=settings.steps.delimiter,
                           stop_token=STOP_TOKEN, temperature=sampling.temperature)
    if algorithm == "beam-search":
        # its beam_width is the paths kept (budget / M), each copied M times: our N and M
        return BeamSearch(steps, adapter, beam_width=budget // settings.beam_width)
    return ParticleFiltering(steps, adapter)


def _figures(adapter: ProcessRewardAdapter | None, scorer_backend: CountingBackend | None,
             problem: Problem) -> dict[str, int] | None:
    """A search's figures for the question: rounds of scoring are its steps (one per level); the
    step requests are the endpoint's count less the scorer's (``SCORER_REQUESTS``, settled by the caller)."""
    if adapter is None or scorer_backend is None:
        return None
    state = adapter.questions.get(problem.question)
    if state is None:
        return {"steps": 0, "round_trips": 0, "scoring_calls": 0, SCORER_REQUESTS: 0}
    return {"steps": state.rounds, "round_trips": state.rounds + state.scoring_rounds,
            "scoring_calls": state.scoring_calls(), SCORER_REQUESTS: scorer_backend.calls.get(problem.id, 0)}


def _seed_numpy(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)  # its-hub's systematic resampling draws from numpy's global generator


def scorer(algorithm: str, search: PeerSearch | None = None) -> str | None:
    if algorithm in SEARCHES:
        return search.process_scorer().name if search is not None else None
    return "llm-judge" if algorithm == "best-of-n" else None


def fixed_budget(algorithm: str) -> int | None:
    return None


def unwrap(prompt: Any) -> Any:
    return prompt


def rewrite_body(body: dict[str, Any]) -> dict[str, Any]:
    """its-hub sends vLLM's continue_final_message, add_generation_prompt and
    include_stop_str_in_output twice: as fields and again in a literal ``extra_body`` (an
    openai-python argument, not a field of the API), which a strict server refuses. Where
    ``extra_body`` only repeats fields (or sets what a field left unset) it is folded in."""
    extra = body.get("extra_body")
    if not isinstance(extra, dict):
        return body
    if any(k in body and body[k] != v for k, v in extra.items()):
        return body  # they disagree: the server should say so
    rest = {k: v for k, v in body.items() if k != "extra_body"}
    return {**extra, **rest}
