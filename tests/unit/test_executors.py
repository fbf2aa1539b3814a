"""Executors: a batch's rounds run here or on remote workers with the same answers, spend and
allocation decisions (taken at round barriers, so completion order cannot change them)."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from fractions import Fraction

import pytest

from apportion.algorithms.base import SamplingOptions
from apportion.algorithms.registry import make_algorithm
from apportion.algorithms.self_consistency import SelfConsistency
from apportion.allocate.engine import BatchResult, answer_batch
from apportion.allocate.executors import (
    JobNotSent,
    RemoteExecutor,
    Work,
    WorkerFailed,
    round_caps,
)
from apportion.allocate.policies import make_policy
from apportion.allocate.remote import Job, Reply, serve
from apportion.banks import BankEntry, BankSample, Problem, SampleBank
from apportion.batch import Item
from apportion.budget.ledger import HELD_UNITS, Ask, Ledger, Remaining
from apportion.budget.units import Budget, Price, Spend, Usage
from apportion.errors import BudgetError
from apportion.lm.base import Prompt, SamplingParams
from apportion.lm.replay import ReplayBackend

SAMPLING = SamplingOptions(max_tokens=40, min_tokens=1, system_prompt="Answer.")
SAMPLING_OPTIONS = make_algorithm("self-consistency", SAMPLING).options
PRICE = Price(1.0, 3.0)
# (answers in recorded order, output tokens of each): easy, contested, scattered, hopeless questions
QUESTIONS = {
    "What is 2 + 2?": (["4"] * 10, [9, 11, 8, 12, 10, 9, 7, 13, 10, 11]),
    "What is 7 * 8?": (["56", "54", "56", "56", "48", "56", "54", "56", "56", "54"],
                       [20, 25, 18, 30, 22, 19, 27, 21, 24, 26]),
    "What is 17 + 26?": ([str(40 + i) for i in range(10)], [35, 31, 38, 29, 33, 36, 30, 34, 32, 37]),
    "What is 100 / 4?": (["25", "20", "25", "24", "25", "25", "30", "25", "20", "25"],
                         [15, 17, 16, 14, 18, 15, 16, 17, 14, 16]),
    "What is 9 - 3?": (["6", "6", "5", "6", "6", "6", "6", "6", "6", "6"], [12, 10, 11, 13, 12, 10, 11, 12, 13, 10]),
}


def _bank() -> SampleBank:
    entries = []
    for n, (question, (answers, tokens)) in enumerate(QUESTIONS.items()):
        samples = tuple(BankSample(f"Working... the answer is {a}", a, t) for a, t in zip(answers, tokens))
        entries.append(BankEntry(Problem(str(n), question, answers[0]), samples, prompt_tokens=30 + n))
    return SampleBank(entries, {"model": "bank-model"})


@pytest.fixture(scope="module")
def bank_file(tmp_path_factory: pytest.TempPathFactory):
    """Saved and loaded again, as a batch over a bank file would be."""
    path = tmp_path_factory.mktemp("bank") / "bank.jsonl"
    _bank().save(path)
    return path


def _items() -> list[Item]:
    return [Item(i + 1, i + 1, q) for i, q in enumerate(QUESTIONS)]


async def _batch(path, policy: str, total: Budget, executor=None, *, concurrency: int = 4,
                 seed: int = 3) -> tuple[BatchResult, ReplayBackend]:
    backend = ReplayBackend(SampleBank.load(path), seed=seed, price=PRICE)
    result = await answer_batch(
        _items(), backend, total, make_policy(policy, window=concurrency, probe=2, horizon=10),
        lambda name: make_algorithm(name, SAMPLING), max_tokens=SAMPLING.max_tokens,
        system_prompt=SAMPLING.system_prompt, concurrency=concurrency, seed=seed, max_samples=10, executor=executor)
    return result, backend


def _seen(result: BatchResult) -> list[tuple]:
    """Everything a run decides and accounts, per prompt (wall times aside)."""
    rows = []
    for o in result.outcomes:
        r = o.result
        spent = None if r is None else replace(r.spent, seconds=0.0)
        rows.append((o.status, o.error, o.allocation, spent,
                     None if r is None else (r.answer, r.distribution, [c.text for c in r.candidates], r.exhausted,
                                             r.exhausted_reason, r.budget, r.stop_reason, r.error, r.notes,
                                             [replace(c, latency_s=0.0) for c in r.trace])))
    return rows


def _same(a: BatchResult, b: BatchResult) -> None:
    assert _seen(a) == _seen(b)
    assert replace(a.spent, seconds=0.0) == replace(b.spent, seconds=0.0)
    assert (a.rounds, a.notes, a.policy) == (b.rounds, b.notes, b.policy)


async def _in_another_process(job: Job) -> Reply:
    """What a remote worker does, here: the job and the reply cross as bytes, as they would to a worker."""
    reply = await serve(pickle.loads(pickle.dumps(job)))
    return pickle.loads(pickle.dumps(reply))


# Generations only: rounds fit the parent together. Tokens: worst cases do not fit, so prompts run
# one at a time and the parent binds. Dollars: shares in fractions of a cent. A deadline travels
# as seconds left.
TOTALS = [Budget(generations=17), Budget(total_tokens=900), Budget(generations=30, output_tokens=500),
          Budget(usd=0.0006), Budget(generations=20, seconds=600)]


@pytest.mark.parametrize("policy", ["uniform", "marginal-gain", "difficulty-bins", "back-load"])
@pytest.mark.parametrize("total", TOTALS, ids=str)
async def test_remote_rounds_match_local_ones(bank_file, policy, total):
    local, local_backend = await _batch(bank_file, policy, total)
    remote, remote_backend = await _batch(bank_file, policy, total, RemoteExecutor(_in_another_process))
    _same(local, remote)
    assert not remote.spent.violations(total)
    # the driver's bank continues where the workers left off, question by question
    assert [local_backend.served(q) for q in QUESTIONS] == [remote_backend.served(q) for q in QUESTIONS]


async def test_results_do_not_depend_on_how_many_run_at_once(bank_file):
    one, _ = await _batch(bank_file, "marginal-gain", Budget(generations=20), RemoteExecutor(_in_another_process),
                          concurrency=1)
    many, _ = await _batch(bank_file, "marginal-gain", Budget(generations=20), RemoteExecutor(_in_another_process),
                           concurrency=5)
    assert [o.result.answer for o in one.outcomes] == [o.result.answer for o in many.outcomes]
    assert [o.allocation for o in one.outcomes] == [o.allocation for o in many.outcomes]


class _Crashing(SelfConsistency):
    """Draws its samples, then fails with a bug (not an ApportionError)."""

    async def run(self, lm, prompt, budget, *, seed=None, prior=()):
        await super().run(lm, prompt, budget, seed=seed, prior=prior)
        raise RuntimeError("a bug on the worker")


def _work(ledger: Ledger, algorithm=None, backend=None, question: str = "What is 7 * 8?") -> Work:
    return Work(algorithm or make_algorithm("self-consistency", SAMPLING), backend or ReplayBackend(_bank(), seed=1),
                question, ledger, 5, ())


def _nothing_held(ledger: Ledger) -> bool:
    """What remains is the limits less what was spent: no hold or reservation outlived its work."""
    rem, spent, b = ledger.remaining(), ledger.spend(), ledger.budget
    return (rem.generations, rem.total_tokens) == (
        None if b.generations is None else b.generations - spent.generations,
        None if b.total_tokens is None else b.total_tokens - spent.input_tokens - spent.output_tokens)


async def test_a_failing_worker_reports_its_spend_and_the_prompt_fails():
    parent = Ledger(Budget(generations=20, total_tokens=5000))
    child = parent.child(Budget(generations=4))
    with pytest.raises(WorkerFailed, match="a bug on the worker"):
        await RemoteExecutor(_in_another_process).run(_work(child, _Crashing(SAMPLING_OPTIONS)))
    assert child.spend().generations == 4 and parent.spend().generations == 4  # what it drew is charged
    assert _nothing_held(parent) and _nothing_held(child)


async def test_a_lost_worker_is_charged_its_whole_allowance_and_nothing_stays_held():
    async def lost(job: Job) -> Reply:
        raise ConnectionError("node died")

    parent = Ledger(Budget(generations=20, total_tokens=5000))
    child = parent.child(Budget(generations=3))
    with pytest.raises(WorkerFailed, match="node died"):
        await RemoteExecutor(lost).run(_work(child))
    spent = parent.spend()
    assert (spent.generations, spent.input_tokens + spent.output_tokens, spent.estimated) == (3, 5000, True)
    assert _nothing_held(parent) and _nothing_held(child)


async def test_a_job_never_sent_is_released():
    async def unsent(job: Job) -> Reply:
        raise JobNotSent("no cluster")

    parent = Ledger(Budget(generations=20))
    child = parent.child(Budget(generations=3))
    with pytest.raises(JobNotSent):
        await RemoteExecutor(unsent).run(_work(child))
    assert replace(parent.spend(), seconds=0.0) == Spend()
    assert parent.remaining().generations == 20


async def test_a_batch_with_a_failing_worker_answers_the_other_prompts(bank_file):
    def make(name: str):
        return _Crashing(SAMPLING_OPTIONS) if name == "crash" else make_algorithm(name, SAMPLING)

    class OneCrashes:
        """The second prompt's algorithm fails on the worker."""

        def __init__(self) -> None:
            self.inner = RemoteExecutor(_in_another_process)

        async def run(self, work: Work):
            if work.prompt == "What is 7 * 8?":
                work = replace(work, algorithm=make("crash"))
            return await self.inner.run(work)

    total = Budget(generations=15)
    result, _ = await _batch(bank_file, "uniform", total, OneCrashes())
    statuses = [o.status for o in result.outcomes]
    assert statuses[1] == "failed" and "a bug on the worker" in result.outcomes[1].error
    assert statuses.count("answered") == 4
    # the failed prompt's draws (its share, 15 / 5) are charged to the total though its row has no result
    assert result.spent.generations == sum(o.result.spent.generations for o in result.outcomes if o.result) + 3
    assert not result.spent.violations(total)


def test_round_caps_share_the_slack_and_never_sum_past_what_is_left():
    left = Remaining(generations=10, input_tokens=None, output_tokens=100, total_tokens=None,
                     usd=Fraction(1, 3), seconds=None, tool_calls=5)
    caps = round_caps(left, [{"generations": 2.0, "output_tokens": 40.0, "usd": 0.1}, {"generations": 3.0}, None])
    assert [c.generations for c in caps] == [2 + 1, 3 + 1, 0 + 1]
    assert [c.output_tokens for c in caps] == [40 + 20, 20, 20]
    assert [c.tool_calls for c in caps] == [1, 1, 1]
    assert [c.input_tokens for c in caps] == [None] * 3
    assert sum(c.usd for c in caps) == Fraction(1, 3)
    assert caps[0].usd - caps[1].usd == Fraction(0.1)


def test_a_hold_fits_or_holds_nothing_and_settles_with_what_was_spent():
    parent = Ledger(Budget(generations=10, total_tokens=1000, usd=1.0))
    child = parent.child(Budget(generations=6))
    none = Remaining(**dict.fromkeys((*HELD_UNITS, "seconds")))
    assert child.hold(replace(none, generations=7)) is None  # more than the child allows
    assert child.hold(replace(none, total_tokens=1001)) is None  # more than the parent allows
    held = child.hold(replace(none, generations=6, total_tokens=800, usd=Fraction(1, 2)))
    assert held is not None
    assert parent.remaining().total_tokens == 200 and parent.remaining().usd == Fraction(1, 2)
    assert parent.reserve(Ask(1, 300, 0)).max_tokens == 200  # the hold binds other calls
    with pytest.raises(BudgetError, match="6 generations"):
        child.settle_hold(held, Spend(generations=7))
    child.settle_hold(held, Spend(generations=5, input_tokens=100, output_tokens=250, usd=Fraction(1, 4), calls=2))
    assert parent.spend().generations == 5 and parent.spend().calls == 2
    assert parent.remaining().total_tokens == 1000 - 350 - 200  # the open reservation above still counts
    with pytest.raises(BudgetError, match="twice"):
        child.release_hold(held)


def test_a_stand_in_ledger_has_exactly_what_was_left():
    original = Ledger(Budget(generations=8, usd=0.001, total_tokens=500))
    original.settle(original.reserve(Ask(3, 50, 20, Price(1.0, 3.0))), Usage(3, 20, 70))
    stand_in = Ledger.standing_in(original.budget, original.remaining())
    assert stand_in.remaining() == replace(original.remaining(), seconds=None)
    assert stand_in.spend().generations == 0
    with pytest.raises(BudgetError, match="more than the limit"):
        Ledger.standing_in(Budget(generations=2), replace(original.remaining(), generations=3))


async def test_a_replay_shard_serves_on_where_its_backend_stood():
    whole = ReplayBackend(_bank(), seed=4)
    question = "What is 7 * 8?"
    prompt = Prompt.chat(question, system="Answer.")
    first = await whole.generate(prompt, SamplingParams(n=3, max_tokens=40))
    shard = pickle.loads(pickle.dumps(whole.shard(question)))
    elsewhere = ReplayBackend.from_shard(shard)
    second = await elsewhere.generate(prompt, SamplingParams(n=4, max_tokens=40))
    whole.resume(question, elsewhere.served(question))
    third = await whole.generate(prompt, SamplingParams(n=3, max_tokens=40))
    reference = ReplayBackend(_bank(), seed=4)
    straight = await reference.generate(prompt, SamplingParams(n=10, max_tokens=40))
    assert [s.text for c in (first, second, third) for s in c.samples] == [s.text for s in straight.samples]
    assert elsewhere.model == whole.model and elsewhere.capabilities == whole.capabilities


# -- Ray: a local instance, two CPUs ----------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'apportion[ray]')")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway instance: no token written to the home folder
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()


@pytest.mark.parametrize("policy,total", [("uniform", Budget(total_tokens=900)),
                                          ("marginal-gain", Budget(generations=17)),
                                          ("marginal-gain", Budget(usd=0.0006))], ids=str)
async def test_ray_and_local_executors_give_the_same_answers_and_spend(ray_instance, bank_file, policy, total):
    from apportion.allocate.ray_executor import RayExecutor

    executor = RayExecutor()
    on_ray, ray_backend = await _batch(bank_file, policy, total, executor)
    local, local_backend = await _batch(bank_file, policy, total)
    executor.close()
    assert ray_instance.is_initialized()  # it joined the instance the test started, and leaves it running
    _same(local, on_ray)
    assert not on_ray.spent.violations(total)
    assert [local_backend.served(q) for q in QUESTIONS] == [ray_backend.served(q) for q in QUESTIONS]


class _Dying(SelfConsistency):
    """The worker process dies mid-run."""

    async def run(self, lm, prompt, budget, *, seed=None, prior=()):
        os._exit(1)


async def test_a_ray_worker_that_dies_is_reported_and_charged_its_allowance(ray_instance):
    from apportion.allocate.ray_executor import RayExecutor

    parent = Ledger(Budget(generations=20, total_tokens=5000))
    child = parent.child(Budget(generations=2))
    with pytest.raises(WorkerFailed, match="lost"):
        await RayExecutor().run(_work(child, _Dying(SAMPLING_OPTIONS)))
    assert parent.spend().generations == 2 and parent.spend().estimated
    assert _nothing_held(parent) and _nothing_held(child)
    # the cluster carries on (the lost worker took all the tokens the parent had left)
    after = Ledger(Budget(generations=20)).child(Budget(generations=2))
    result = await RayExecutor().run(_work(after))
    assert result.spent.generations == 2 and result.answer is not None


def test_backends_travel_as_specs_and_others_are_refused():
    from apportion.allocate.remote import EmbeddedSpec, HTTPSpec, spec_for
    from apportion.errors import ConfigError
    from apportion.lm import EmbeddedOptions, HTTPOptions, LlamaEmbeddedBackend, OpenAIHTTPBackend, ScriptedBackend

    options = HTTPOptions(base_url="http://127.0.0.1:9/v1", model="m", api_key="k", price=PRICE)
    spec = pickle.loads(pickle.dumps(spec_for(OpenAIHTTPBackend(options), "q")))
    assert isinstance(spec, HTTPSpec) and spec.build().options == options
    embedded = spec_for(LlamaEmbeddedBackend(EmbeddedOptions(model_name="small", price=PRICE)), "q")
    assert isinstance(embedded, EmbeddedSpec)
    built = embedded.build()  # the model loads on first use, not here
    assert built is embedded.build() and built.model == "small" and not embedded.closes()
    with pytest.raises(ConfigError, match="cannot send the 'scripted'"):
        spec_for(ScriptedBackend(lambda *a: "x"), "q")
