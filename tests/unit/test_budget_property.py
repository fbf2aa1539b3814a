"""Attack the reserve/settle protocol: whatever the budget, algorithm and model output, no limit is
ever exceeded, and what a run reports as spent is exactly the sum of what the backend reported
(prompt tokens a server served from its cache charged at the price's cached rate, where it has one)."""

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apportion import (
    BestOfN,
    BestOfNOptions,
    Budget,
    LLMJudge,
    Price,
    SamplingOptions,
    SelfConsistency,
    SelfConsistencyOptions,
)
from apportion.budget.units import Usage, to_fraction
from apportion.lm.scripted import Reply, ScriptedBackend
from tests.conftest import examples

WORDS = ["the", "answer", "is", "7", "12", "so", "we", "add", "Score:", "9", "3/10", "carry"]

texts = st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join)
replies = st.lists(
    st.builds(Reply, texts, st.one_of(st.none(), st.floats(-5, 0))), min_size=1, max_size=6)


@st.composite
def budgets(draw):
    limits = {
        "generations": st.integers(1, 20),
        "input_tokens": st.integers(1, 600),
        "output_tokens": st.integers(1, 600),
        "total_tokens": st.integers(1, 1000),
        "usd": st.sampled_from([0.0005, 0.001, 0.003, 0.01]),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(limits)), min_size=1, max_size=5, unique=True))
    return Budget(**{name: draw(limits[name]) for name in chosen})


ALGORITHMS = ["self-consistency", "best-of-n", "weighted-best-of-n", "best-of-n-judge"]


class Recording(ScriptedBackend):
    """Keeps every usage the backend reported, to compare with what the ledger says was spent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reported: list[Usage] = []

    async def generate(self, prompt, params, *, deadline=None):
        completion = await super().generate(prompt, params, deadline=deadline)
        self.reported.append(completion.usage)
        return completion


def make(name: str, sampling: SamplingOptions):
    if name == "self-consistency":
        return SelfConsistency(SelfConsistencyOptions(sampling))
    if name == "best-of-n-judge":
        return BestOfN(BestOfNOptions(sampling), scorer=LLMJudge())
    return BestOfN(BestOfNOptions(sampling, weighted=name.startswith("weighted")))


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budget=budgets(),
    algorithm=st.sampled_from(ALGORITHMS),
    outputs=replies,
    native_n=st.booleans(),
    price=st.builds(lambda i, o, c: Price(i, o, None if c is None else i * c),
                    st.sampled_from([0.5, 1.0, 10.0]), st.sampled_from([1.0, 2.0, 30.0]),
                    st.sampled_from([None, 0.0, 0.1, 0.5, 1.0])),
    cached=st.sampled_from([0, 0, 3, 8, 1000]),
    max_tokens=st.integers(1, 30),
    min_fraction=st.floats(0.0, 1.0),
    batch_size=st.one_of(st.none(), st.integers(1, 5)),
)
def test_no_limit_is_ever_exceeded_and_spend_is_exactly_reported(
        budget, algorithm, outputs, native_n, price, cached, max_tokens, min_fraction, batch_size):
    lm = Recording(outputs, native_n=native_n, price=price, cached_prompt_tokens=cached)
    sampling = SamplingOptions(max_tokens=max_tokens, min_tokens=max(1, int(max_tokens * min_fraction)),
                               batch_size=batch_size)
    result = asyncio.run(make(algorithm, sampling).run(lm, "What is 3 + 4?", budget, seed=1))
    spent = result.spent

    if budget.generations is not None:
        assert spent.generations <= budget.generations
    if budget.input_tokens is not None:
        assert spent.input_tokens <= budget.input_tokens
    if budget.output_tokens is not None:
        assert spent.output_tokens <= budget.output_tokens
    if budget.total_tokens is not None:
        assert spent.total_tokens <= budget.total_tokens
    if budget.usd is not None:
        assert spent.usd <= to_fraction(budget.usd)

    total = sum(lm.reported, Usage())
    assert spent.input_tokens == total.input_tokens
    assert spent.output_tokens == total.output_tokens
    assert spent.generations + spent.scorer_generations == total.generations
    assert spent.cached_input_tokens == total.cached_input_tokens
    assert spent.usd == price.cost(total.input_tokens, total.output_tokens, total.cached_input_tokens)
    assert not spent.violations(budget)
    assert spent.calls == len(lm.reported) == len(result.trace)
    # every candidate the run reports was paid for
    assert len(result.candidates) == spent.generations
