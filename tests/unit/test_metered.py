"""The metered layer: every request a call needs goes through the ledger, and paid work is kept.

Each test here failed before the metered layer owned make-up, retry and fan-out requests (the
HTTP backend made them on its own, past the reservation)."""

import asyncio
from dataclasses import replace

import pytest

from apportion import (
    Budget,
    Ledger,
    LLMJudge,
    Prompt,
    SamplingOptions,
    SamplingParams,
    SelfConsistency,
    SelfConsistencyOptions,
)
from apportion.algorithms.best_of_n import BestOfN
from apportion.budget.units import Usage
from apportion.errors import BackendError, BackendUnavailable, BudgetExhausted, RunFailed
from apportion.lm.metered import MAX_FRUITLESS_ROUNDS, MeteredLM
from apportion.lm.n_support import FIRST_PROBE, IGNORED_AFTER, NSupport
from apportion.lm.scripted import Reply, ScriptedBackend

QUESTION = "What is 40 plus 2?"
PROMPT = Prompt.chat(QUESTION)


def sc(**sampling):
    return SelfConsistency(SelfConsistencyOptions(SamplingOptions(**sampling)))


class Flaky(ScriptedBackend):
    """A scripted backend whose requests misbehave by a plan: ``short`` (one sample), ``extra``
    (n + 2, all charged), ``fail`` (unbilled), ``billed`` (reported usage, no samples),
    ``unknown`` (billed, cost unknown); anything else answers normally."""

    def __init__(self, plan, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = list(plan)

    async def generate(self, prompt, params, *, deadline=None):
        step = self.plan.pop(0) if self.plan else "ok"
        if step == "fail":
            self.calls.append(None)
            raise BackendUnavailable("HTTP 503 after retries")
        if step == "billed":
            self.calls.append(None)
            raise BackendError("200 with no choices", consumed=Usage(0, 10, 7), retryable=True)
        if step == "unknown":
            self.calls.append(None)
            raise BackendError("reply cut off", billed=True, retryable=True)
        asked = {"short": 1, "extra": params.n + 2}.get(step, params.n)
        return await super().generate(prompt, replace(params, n=asked), deadline=deadline)


async def test_a_short_reply_is_made_up_within_the_input_budget():
    # the prompt costs 8 tokens (5 words + 3 per message); input=20 pays for two requests, not three
    lm = Flaky(["short", "short", "short"], ["The answer is 42"])
    ledger = Ledger(Budget(generations=4, input_tokens=20))
    completion = await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=4, max_tokens=8))
    spent = ledger.spend()
    assert spent.input_tokens == 16 and spent.generations == 2 and len(completion.samples) == 2
    assert ledger.exhausted_reason.startswith("input_tokens")
    assert len(ledger.trace) == 2 and spent.violations(ledger.budget) == []


async def test_more_samples_than_asked_are_cut_and_their_tokens_counted_as_the_servers():
    lm = Flaky(["extra"], ["The answer is 42 indeed"])
    ledger = Ledger(Budget(generations=4, output_tokens=20))
    completion = await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=4, max_tokens=5))
    spent = ledger.spend()
    assert len(completion.samples) == spent.generations == 4
    assert spent.output_tokens == 30  # six samples of five words were generated and are billed
    assert spent.overrun.output_tokens == 10 and spent.violations(ledger.budget) == []
    assert any("kept the first 4" in n for n in ledger.trace[0].notes)


async def test_billed_failures_are_charged_and_retried_through_the_ledger():
    lm = Flaky(["billed", "unknown"], ["The answer is 42"])
    ledger = Ledger(Budget(generations=2, total_tokens=1000))
    completion = await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=2, max_tokens=50))
    assert len(completion.samples) == 2 and completion.error is None
    failed = [r for r in ledger.trace if r.error]
    assert [r.usage for r in failed] == [Usage(0, 10, 7), Usage(0, 8, 100, estimated=True)]
    spent = ledger.spend()
    assert spent.estimated and spent.generations == 2
    assert spent.total_tokens == 17 + 108 + 8 + 8


async def test_unbilled_failures_cost_nothing():
    lm = Flaky(["fail"], ["The answer is 42"])
    ledger = Ledger(Budget(generations=2))
    with pytest.raises(BackendUnavailable):
        await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=2))
    assert ledger.spend().total_tokens == 0 and ledger.remaining().generations == 2


async def test_a_server_that_keeps_failing_after_generating_is_given_up():
    lm = Flaky(["billed"] * 20, ["The answer is 42"])
    ledger = Ledger(Budget(generations=2))
    with pytest.raises(BackendError, match="no choices"):
        await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=2))
    assert len(lm.calls) == MAX_FRUITLESS_ROUNDS and ledger.spend().calls == MAX_FRUITLESS_ROUNDS


async def test_samples_drawn_before_a_later_failure_are_returned_with_it():
    lm = Flaky(["short", "fail"], ["The answer is 42"])
    ledger = Ledger(Budget(generations=4))
    completion = await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=4))
    # one sample, then the other three asked for one each: one of those failed for good
    assert len(completion.samples) == 3 and isinstance(completion.error, BackendUnavailable)


async def test_a_run_keeps_its_answer_when_a_later_call_fails():
    lm = Flaky(["ok", "fail"], ["The answer is 42"])
    result = await sc(batch_size=2).run(lm, QUESTION, Budget(generations=6))
    assert result.answer == "42" and result.partial and "503" in result.error
    assert len(result.candidates) == 2 and result.spent.generations == 2
    assert result.to_dict()["partial"] is True


async def test_a_run_that_draws_nothing_raises_with_its_spend():
    lm = Flaky(["billed"] * 20, ["The answer is 42"])
    with pytest.raises(RunFailed) as failure:
        await SelfConsistency().run(lm, QUESTION, Budget(generations=3))
    result = failure.value.result
    assert result.answer is None and not result.partial and result.error
    assert result.spent.total_tokens == MAX_FRUITLESS_ROUNDS * 17


async def test_judge_failures_keep_the_candidates_and_the_scores_had():
    policy = ScriptedBackend(["The answer is 42", "The answer is 41"])
    judge = Flaky(["ok", "fail"], ["Score: 9"])
    result = await BestOfN(scorer=LLMJudge(judge)).run(policy, QUESTION, Budget(generations=2))
    assert len(result.candidates) == 2 and result.partial and "judge failed on 1 of 2" in result.error
    assert sorted(c.score is None for c in result.candidates) == [False, True]
    assert result.answer in ("42", "41")


async def test_one_request_per_sample_reserves_the_prompt_each_time():
    lm = ScriptedBackend(["The answer is 42"], native_n=False)
    ledger = Ledger(Budget(generations=8, input_tokens=8 * 3 + 7))
    completion = await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=8, max_tokens=8, seed=3))
    assert len(completion.samples) == 3 and ledger.spend().input_tokens == 24
    assert [c.params.n for c in lm.calls] == [1, 1, 1]
    assert [c.params.seed for c in lm.calls] == [3, 4, 5]


async def test_a_cancelled_call_is_charged_its_worst_case():
    lm = ScriptedBackend(["The answer is 42"], latency_s=5)
    ledger = Ledger(Budget(generations=2))
    task = asyncio.ensure_future(MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=2, max_tokens=10)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spent = ledger.spend()
    assert spent.estimated and spent.output_tokens == 20 and spent.input_tokens == 8 and spent.generations == 0


async def test_a_deadline_keeps_what_earlier_calls_drew():
    lm = Flaky(["ok", "ok"], ["The answer is 42"], latency_s=0.2)
    result = await sc(batch_size=1).run(lm, QUESTION, Budget(seconds=0.5))
    assert result.answer == "42" and result.error is None
    assert result.exhausted or result.stop_reason == "deadline"  # cut at it, or a call not started
    assert result.spent.generations >= 1


def test_n_support_needs_evidence_and_recovers():
    n = NSupport()
    assert n.batches
    n.observe(8, 1)  # one transient short reply changes nothing
    n.observe(8, 8)
    assert n.batches and not n.ignoring
    for _ in range(IGNORED_AFTER):
        n.observe(8, 1)
    assert n.ignoring and not n.batches
    for _ in range(FIRST_PROBE):
        n.observe(1, 1)
    assert n.batches  # time to probe n again
    assert n.observe(8, 8) is not None and n.batches and not n.ignoring
    for _ in range(IGNORED_AFTER):
        n.observe(8, 1)
    for _ in range(FIRST_PROBE):
        n.observe(1, 1)
    for _ in range(8):  # eight concurrent calls all probing at once: one failed probe, not eight
        n.observe(8, 1)
    for _ in range(2 * FIRST_PROBE):
        n.observe(1, 1)
    assert n.batches
    capped = NSupport()
    for _ in range(10):
        capped.observe(16, 4)  # a server capping n is still batched
    assert capped.batches


async def test_budget_exhausted_before_any_request():
    lm = ScriptedBackend(["The answer is 42"])
    ledger = Ledger(Budget(input_tokens=5))
    with pytest.raises(BudgetExhausted, match="input_tokens"):
        await MeteredLM(lm, ledger).generate(PROMPT, SamplingParams(n=2))


async def test_a_failed_sample_is_asked_for_again_with_its_own_seed_never_another_samples():
    failed = set()

    def reply(prompt, params, call, i):
        if params.seed == 101 and not failed:
            failed.add(101)
            return Reply("", error=BackendError("reply cut off", billed=True, retryable=True))
        return f"drawn with seed {params.seed}"

    lm = ScriptedBackend(reply, native_n=False)
    completion = await MeteredLM(lm, Ledger(Budget(generations=4))).generate(
        PROMPT, SamplingParams(n=4, max_tokens=16, seed=100))
    assert [c.params.seed for c in lm.calls] == [100, 101, 102, 103, 101]
    assert [s.text for s in completion.samples] == [f"drawn with seed {k}" for k in (100, 101, 102, 103)]


async def test_cancelled_before_its_requests_start_leaves_no_reservation_open():
    lm = ScriptedBackend(["The answer is 42"], native_n=False, latency_s=0.5)
    parent = Ledger(Budget(generations=100))
    child = parent.child(Budget(generations=8))
    task = asyncio.ensure_future(MeteredLM(lm, child).generate(PROMPT, SamplingParams(n=4, max_tokens=16)))
    await asyncio.sleep(0)  # reserved, its requests only scheduled
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert child.remaining().generations == 8 and parent.remaining().generations == 100
    assert not lm.calls and child.spend().calls == 0
