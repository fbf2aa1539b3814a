"""Peers side by side on a replay endpoint: its-hub's own algorithms on the samples our replay uses."""

import pytest

from apportion.algorithms.base import SamplingOptions
from apportion.banks import SampleBank
from apportion.bench.grid import GridOptions
from apportion.bench.harness import BenchSpec, run_bench
from apportion.bench.peers import PeerRun, its_hub, optillm, peer_rows
from apportion.bench.peers.endpoint import UNMATCHED, CountingBackend
from apportion.errors import BackendError, ConfigError, ModelNotFound
from apportion.lm.base import Message, Prompt, SamplingParams
from apportion.lm.replay import ReplayBackend
from apportion.lm.scripted import ScriptedBackend
from tests.unit.test_bench_grid import problems, sampler

SAMPLING = SamplingOptions(max_tokens=32, system_prompt="Be brief.")


@pytest.fixture
async def drawn(tmp_path):
    qs = problems(8)
    options = GridOptions(("self-consistency",), (1, 4), SAMPLING, orders=1)
    outcome = await run_bench(BenchSpec(qs, options, "toy", tmp_path), ScriptedBackend(sampler))
    return qs, SampleBank.load(tmp_path / "bank.jsonl"), outcome


async def test_counting_matches_requests_to_questions(drawn):
    qs, bank, _ = drawn
    counter = CountingBackend(ReplayBackend(bank), qs)
    asked = Prompt.chat(qs[2].question, system="Be brief.")
    await counter.generate(asked, SamplingParams(n=2))
    judge = Prompt.chat(f"Grade this.\nQuestion: {qs[5].question}\nAnswer: 10")
    assert counter.question_of(asked) == qs[2].id and counter.question_of(judge) == qs[5].id
    assert counter.question_of(Prompt.chat("What is love?")) == UNMATCHED
    assert counter.usage[qs[2].id].generations == 2 and counter.calls[qs[2].id] == 1
    with pytest.raises(ModelNotFound):
        await counter.generate(judge, SamplingParams())
    assert counter.refused == 1


def test_optillm_wrapping_is_undone():
    wrapped = Prompt(messages=(Message("system", ""), Message("user", "User: What is 2+2?")))
    assert optillm.unwrap(wrapped) == Prompt.chat("What is 2+2?")
    plain = Prompt.chat("User: tell me", system="s")
    assert optillm.unwrap(plain).messages[-1].content == "tell me"


@pytest.mark.skipif(its_hub.available() is not None, reason="its-hub is a dev extra")
async def test_its_hub_self_consistency_on_the_replayed_bank(drawn):
    qs, bank, ours = drawn
    run = PeerRun(lambda order: ReplayBackend(bank, seed=order), "replay", 1, SAMPLING)
    cells = await peer_rows("its_hub", ["self-consistency"], [1, 4], qs, run)
    assert run.failures == []
    (one, _), (four, four_q) = cells
    assert (one.system, one.mode, four.budget) == ("its_hub", "replay", 4)
    ours_four = next(r for r in ours.rows if r.budget == 4)
    # the same samples: every reply is 7 tokens, but its-hub sends b requests of n=1, so it pays for
    # the prompt b times where one request with n=b pays once
    assert four.output_tokens == ours_four.output_tokens == 28
    assert four.input_tokens == pytest.approx(4 * ours_four.input_tokens)
    # on the first order both vote over the same four samples per question
    theirs = [o.answer for o in four_q]
    mine = await _first_answers(bank, 4)
    agree = sum(a == b for a, b in zip(theirs, mine))
    assert agree >= len(qs) - 1, (theirs, mine)


async def _first_answers(bank, budget):
    from apportion.bench.replay import replay

    return list((await replay(bank, "self-consistency", [budget], orders=1, seed=0))[0].first_answers)


@pytest.mark.skipif(its_hub.available() is not None, reason="its-hub is a dev extra")
async def test_a_judge_on_a_replay_endpoint_is_reported_not_hidden(drawn):
    qs, bank, _ = drawn
    run = PeerRun(lambda order: ReplayBackend(bank, seed=order), "replay", 1, SAMPLING)
    [(row, outcomes)] = await peer_rows("its_hub", ["best-of-n"], [4], qs, run)
    # questions whose four samples all read alike need no judge; the others fail, and say why
    failed = [o for o in outcomes if o.error]
    assert row.errors == len(failed) > 0 and all(o.right == 0 for o in failed)
    assert any("not in a bank" in note for note in row.notes)


async def test_missing_or_unknown_peers(drawn, tmp_path):
    qs, bank, _ = drawn
    run = PeerRun(lambda order: ReplayBackend(bank, seed=order), "replay", 1, SAMPLING)
    if optillm.available() is not None:
        assert await peer_rows("optillm", ["best-of-n"], [2], qs, run) == []
        assert "not installed" in run.failures[-1]
    with pytest.raises(ConfigError, match="unknown peer"):
        await peer_rows("nonesuch", ["best-of-n"], [2], qs, run)
    options = GridOptions(("best-of-n",), (2,), SAMPLING, scorer="judge")
    with pytest.raises(ConfigError, match="OpenAI-compatible server"):
        await run_bench(BenchSpec(qs, options, "toy", tmp_path / "live", peers=("its_hub",)),
                        ScriptedBackend(sampler))


async def test_a_question_asked_twice_is_served_from_both_entries(drawn):
    qs, bank, _ = drawn
    twice = SampleBank([bank.entries[0], bank.entries[0]], bank.meta)
    backend = ReplayBackend(twice)
    prompt = Prompt.chat(qs[0].question, system="Be brief.")
    served = [await backend.generate(prompt, SamplingParams(n=4)) for _ in range(2)]
    assert [len(c.samples) for c in served] == [4, 4]
    with pytest.raises(BackendError, match="recorded samples"):
        await backend.generate(prompt, SamplingParams(n=1))
