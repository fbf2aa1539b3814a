"""Multi-agent debate: scripted agents whose right answer is known, the requests of each round (one
of n=A first, then A together per round), the vote and its ties, and the budget in every unit."""

import asyncio
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion.algorithms.base import DEFAULT_SYSTEM_PROMPT, SamplingOptions
from apportion.algorithms.debate import Debate, DebateOptions
from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget, Price, to_fraction
from apportion.errors import BackendError, ConfigError
from apportion.lm.base import Prompt
from apportion.lm.scripted import Reply, ScriptedBackend
from tests.conftest import examples

QUESTION = "What is 6 * 7?"
FIRST = ("The answer is 41.", "The answer is 42.", "The answer is 42.")
_ANSWER = re.compile(r"answer is (\d+)")


def persuadable(prompt: Prompt, first=FIRST) -> str:
    """An agent: first it answers from ``first`` (by sample index, see ``agents``); shown the
    others, it takes the answer most of them gave, else keeps its own."""
    own = prompt.messages[-2].content
    others = _ANSWER.findall(prompt.messages[-1].content)
    top, count = Counter(others).most_common(1)[0]
    return f"The answer is {top}." if count * 2 > len(others) else own


def agents(first=FIRST, **kwargs) -> ScriptedBackend:
    def reply(prompt, params, call, i):
        if prompt.messages[-1].role == "user" and len(prompt.messages) <= 2:  # round 0
            return first[i % len(first)]
        return persuadable(prompt, first)

    return ScriptedBackend(reply, **kwargs)


@dataclass
class InFlight(ScriptedBackend):
    """A scripted backend that records how many requests were in flight as each one started."""

    now: int = 0
    started: list[int] = field(default_factory=list)

    async def generate(self, prompt, params, *, deadline=None):
        self.now += 1
        self.started.append(self.now)
        try:
            return await super().generate(prompt, params, deadline=deadline)
        finally:
            self.now -= 1


def run(algorithm, backend, budget, **kwargs):
    return asyncio.run(algorithm.run(backend, QUESTION, budget, seed=1, **kwargs))


def test_three_agents_debate_two_rounds_and_vote_the_known_answer():
    lm = agents()
    result = run(Debate(), lm, Budget(generations=3))

    assert result.answer == "42"
    assert [c.answer for c in result.candidates] == ["42", "42", "42"]  # agent 0 was persuaded
    # round 0: one request of n=3; then 2 rounds of 3 requests of n=1
    assert [c.params.n for c in lm.calls] == [3, 1, 1, 1, 1, 1, 1]
    assert [len(c.prompt.messages) for c in lm.calls] == [2, 4, 4, 4, 4, 4, 4]
    first_revision = lm.calls[1].prompt.messages  # agent 0's, round 1
    assert [m.role for m in first_revision] == ["system", "user", "assistant", "user"]
    assert first_revision[0].content == DEFAULT_SYSTEM_PROMPT and first_revision[1].content == QUESTION
    assert first_revision[2].content == "The answer is 41."  # its own answer as its turn
    advice = first_revision[3].content
    assert advice.startswith("These are the solutions to the problem from other agents:")
    assert advice.count("One agent solution: ```The answer is 42.```") == 2 and "41" not in advice
    assert "additional advice" in advice and advice.endswith(QUESTION)
    assert len({c.params.seed for c in lm.calls}) == len(lm.calls)  # no two turns share a seed
    # each agent's final answer is one generation; every turn is a continuation
    assert result.spent.generations == len(result.candidates) == 3
    assert result.spent.continuations == 3 + 3 + 3
    assert {r.kind for r in result.trace} == {"continuation"}
    assert result.exhausted and "generations" in result.exhausted_reason
    s = result.search
    assert (s.steps, s.round_trips, s.requests, s.scoring_calls, s.width) == (3, 3, 7, 0, 3)
    assert result.candidates[s.chosen].answer == "42"


def test_every_round_goes_out_at_once():
    lm = InFlight(lambda prompt, params, call, i: "The answer is 42.", latency_s=0.02)
    result = run(Debate(DebateOptions(rounds=2)), lm, Budget(generations=4))
    # round 0 alone; each revision round's 4 requests are all in flight before the first returns
    assert lm.started == [1, 1, 2, 3, 4, 1, 2, 3, 4]
    assert [c.params.n for c in lm.calls] == [4, 1, 1, 1, 1, 1, 1, 1, 1]
    assert result.spent.generations == 4


def test_the_generation_budget_is_the_number_of_agents():
    lm = agents()
    assert len(run(Debate(DebateOptions(rounds=1)), lm, Budget(generations=5)).candidates) == 5
    assert lm.calls[0].params.n == 5 and len(lm.calls) == 1 + 5
    lm = agents()
    capped = run(Debate(DebateOptions(agents=4, rounds=0)), lm, Budget(generations=6))
    assert [c.params.n for c in lm.calls] == [4] and capped.spent.generations == 4 and not capped.exhausted
    lm = agents()
    unlimited = run(Debate(DebateOptions(rounds=0)), lm, Budget(total_tokens=10_000))
    assert [c.params.n for c in lm.calls] == [3] and unlimited.spent.generations == 3


def test_one_generation_is_one_answer_without_a_debate():
    lm = agents()
    result = run(Debate(), lm, Budget(generations=1))
    assert [c.params.n for c in lm.calls] == [1]
    assert result.answer == "41" and result.spent.generations == 1
    assert any("no debate" in note for note in result.notes)


def test_ties_go_to_the_more_confident_agents_then_the_first_agent():
    even = run(Debate(DebateOptions(rounds=0)), agents(("The answer is 7.", "The answer is 9.")),
               Budget(generations=2))
    assert even.answer == "7" and even.distribution == {"7": 1.0, "9": 1.0}
    sure_of_nine = agents((Reply("The answer is 7.", logprob=-2.0), Reply("The answer is 9.", logprob=-0.1)))
    assert run(Debate(DebateOptions(rounds=0)), sure_of_nine, Budget(generations=2)).answer == "9"


def test_a_refused_turn_ends_the_debate_and_the_answers_so_far_are_voted():
    # round 0 spends 3 x 4 tokens; in round 1 the first two agents reserve 8 tokens each and the
    # third, with 2 tokens left, is refused: it keeps its first answer, and there is no round 2
    sampling = SamplingOptions(max_tokens=8, min_tokens=4)
    lm = agents(latency_s=0.01)
    result = run(Debate(DebateOptions(sampling, rounds=2)), lm, Budget(output_tokens=30))
    assert [c.params.n for c in lm.calls] == [3, 1, 1]
    assert result.exhausted and result.spent.output_tokens <= 30
    assert [c.answer for c in result.candidates] == ["42", "42", "42"]
    assert result.answer == "42" and result.search.steps == 2
    assert result.spent.generations == len(result.candidates) == 3


def test_a_revision_the_budget_cut_short_keeps_the_agents_answer():
    def reply(prompt, params, call, i):
        if len(prompt.messages) <= 2:
            return FIRST[i]
        return "So the answer is 42."  # five tokens

    # round 0: 12 tokens; 11 left: agent 0 gets 7, agent 1 only 4 (its revision is cut), agent 2 none
    sampling = SamplingOptions(max_tokens=7, min_tokens=2)
    result = run(Debate(DebateOptions(sampling, rounds=1)), ScriptedBackend(reply, latency_s=0.01),
                 Budget(output_tokens=23))
    assert [c.text for c in result.candidates] == ["So the answer is 42.", *FIRST[1:]]
    assert result.spent.output_tokens <= 23 and result.spent.generations == 3


def test_round_zero_cut_to_fewer_samples_is_fewer_agents():
    # 3 answers of 8 tokens do not fit 20: the ledger grants two, and no room is left for a third
    sampling = SamplingOptions(max_tokens=8, min_tokens=8)
    lm = agents(("Six times seven gives: the answer is 42.",))
    result = run(Debate(DebateOptions(sampling, rounds=1)), lm, Budget(output_tokens=20))
    assert [c.params.n for c in lm.calls] == [2] and result.spent.output_tokens == 16
    assert result.spent.generations == len(result.candidates) == 2 and result.search.width == 2
    assert result.exhausted and result.search.steps == 2  # the revision round was refused whole


def test_a_failure_in_a_round_keeps_the_answers_before_it():
    def reply(prompt, params, call, i):
        if len(prompt.messages) <= 2:
            return FIRST[i]
        return Reply("", error=BackendError("agent down"))

    result = run(Debate(), ScriptedBackend(reply), Budget(generations=3))
    assert result.error is not None and "agent down" in result.error
    assert [c.text for c in result.candidates] == list(FIRST) and result.answer == "42"
    assert result.spent.generations == 3 and result.search.steps == 2


def test_the_deadline_ends_the_debate_with_the_answers_so_far():
    lm = ScriptedBackend(lambda prompt, params, call, i: "The answer is 42.", latency_s=0.05)
    result = run(Debate(DebateOptions(rounds=50)), lm, Budget(seconds=0.3))
    assert result.exhausted and result.spent.seconds < 1.5 and 1 < result.search.steps < 51
    assert result.answer == "42" and result.spent.generations == len(result.candidates) == 3


def test_interim_results_follow_the_rounds():
    async def collect():
        return [r async for r in Debate(DebateOptions(rounds=2)).stream(agents(), QUESTION, Budget(generations=3))]

    results = asyncio.run(collect())
    assert [r.final for r in results] == [False, False, False, True]
    assert [sorted(r.distribution.items()) for r in results[:2]] == [[("41", 1.0), ("42", 2.0)], [("42", 3.0)]]


def test_a_raw_prompt_and_a_backend_without_continuation():
    class NoContinuation(ScriptedBackend):
        @property
        def capabilities(self):
            return replace(super().capabilities, continuation=False)

    seen = []

    def reply(prompt, params, call, i):
        seen.append(prompt)
        return "The answer is 5." if prompt.text.endswith("A:") else "I agree. The answer is 6."

    result = asyncio.run(Debate(DebateOptions(rounds=1)).run(NoContinuation(reply), Prompt.raw("Q: 2 + 3?\nA:"),
                                                             Budget(generations=2)))
    revision = seen[-1].text
    assert revision.startswith("Q: 2 + 3?\nA:The answer is 5.\n\nThese are the solutions")
    assert "One agent solution: ```The answer is 5.```" in revision
    assert result.answer == "6"


def test_prior_candidates_take_part_in_the_vote():
    first = run(Debate(DebateOptions(rounds=0)), agents(("The answer is 7.",)), Budget(generations=3))
    again = run(Debate(DebateOptions(rounds=0)), agents(("The answer is 8.",)), Budget(generations=2),
                prior=first.candidates)
    assert again.answer == "7" and len(again.candidates) == 5 and again.spent.generations == 2


def test_options_are_checked():
    with pytest.raises(ConfigError, match="at least 2 agents"):
        DebateOptions(agents=1)
    with pytest.raises(ConfigError, match="rounds"):
        DebateOptions(rounds=-1)
    with pytest.raises(ConfigError, match="others"):
        DebateOptions(advice_template="Try again.")
    assert Debate().options_dict()["rounds"] == 2 and Debate().options_dict()["agents"] is None


# -- the budget ------------------------------------------------------------------------------------

TEXTS = ["The answer is 7.", "I think it is 12. The answer is 12.", "Hmm", "", "long " * 20, "\\boxed{7}",
         "Agreed: the answer is 7."]


@st.composite
def budgets(draw):
    limits = {
        "generations": st.integers(1, 8),
        "input_tokens": st.integers(1, 600),
        "output_tokens": st.integers(1, 200),
        "total_tokens": st.integers(1, 800),
        "usd": st.sampled_from([0.0005, 0.001, 0.003]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=4, unique=True))
    return Budget(**{name: draw(limits[name]) for name in chosen})


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=budgets(), salt=st.integers(0, 10_000), agents_=st.one_of(st.none(), st.integers(2, 5)),
       rounds=st.integers(0, 3), native_n=st.booleans(), max_tokens=st.integers(1, 30),
       min_tokens=st.integers(1, 4), latency=st.sampled_from([0.0, 0.001]))
def test_no_limit_is_ever_exceeded_and_every_candidate_is_one_generation(
        budget, salt, agents_, rounds, native_n, max_tokens, min_tokens, latency):
    def reply(prompt, params, call, i):
        key = f"{salt}|{prompt.key()}|{i}|{params.seed}".encode()
        return TEXTS[zlib.crc32(key) % len(TEXTS)]

    lm = ScriptedBackend(reply, native_n=native_n, price=Price(1.0, 2.0), latency_s=latency)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=min_tokens)
    ledger = Ledger(budget)
    result = asyncio.run(Debate(DebateOptions(sampling, agents=agents_, rounds=rounds)).run(lm, QUESTION, ledger,
                                                                                             seed=3))
    spent = result.spent
    assert not spent.violations(budget)
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)
    most = agents_ or 3 if budget.generations is None else min(agents_ or budget.generations, budget.generations)
    assert spent.generations == len(result.candidates) <= most
    if budget.generations is not None:
        assert ledger.remaining().generations == budget.generations - spent.generations  # no hold left behind
    assert not any(r.kind == "policy" for r in result.trace)
    assert result.search.steps <= rounds + 1 and result.search.round_trips == result.search.steps
    assert result.search.requests == sum(1 for r in result.trace if r.kind == "continuation")
    assert all(c.params.n <= most for c in lm.calls)
    # every agent is a sample of round 0 (the metered layer may have drawn them in several requests)
    assert sum(c.params.n for c in lm.calls if len(c.prompt.messages) == 2) == len(result.candidates)
