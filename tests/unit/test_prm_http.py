"""The PRM client against a local server that follows vLLM's Pooling API as it serves
Qwen2.5-Math-PRM (tests/support/fake_prm.py), errors included: every failure gives a clear error
and never a wrong score."""

import pytest

from apportion.budget.ledger import Ledger
from apportion.budget.units import Budget
from apportion.errors import BudgetExhausted, ConfigError, ProcessScoringFailed
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import ScriptedBackend
from apportion.reward import PRMClient, PRMOptions, ProcessScorer
from tests.support.fake_prm import SEP, FakePRM, chat_parts

QUESTION = "What is 2 + 3 * 4?"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def metered(budget: Budget | None = None) -> MeteredLM:
    return MeteredLM(ScriptedBackend(["unused"]), Ledger(budget or Budget(input_tokens=1_000_000)))


def client(fake: FakePRM, **options) -> PRMClient:
    return PRMClient(PRMOptions(base_url=fake.base_url, model=fake.model, **options))


async def test_the_request_is_the_qwen_prm_chat_in_one_pooling_request():
    with FakePRM() as fake:
        prm = client(fake)
        assert isinstance(prm, ProcessScorer)
        await prm.score(metered(), QUESTION, [["3 * 4 = 12.", "2 + 12 = 14."]])
        [body] = fake.billing.bodies
    assert body == {"model": "fake-prm", "input": (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
        f"<|im_start|>assistant\n3 * 4 = 12.{SEP}2 + 12 = 14.{SEP}<|im_end|>\n")}


async def test_messages_format_sends_one_chat_per_path():
    with FakePRM() as fake:
        prm = client(fake, request_format="messages")
        scores = await prm.score(metered(), QUESTION, [["a", "b wrong"], ["c"]])
        bodies = fake.billing.bodies
    assert scores == [[0.9, pytest.approx(0.1)], [0.9]]
    assert len(bodies) == 2
    chats = sorted(bodies, key=lambda b: len(b["messages"][2]["content"]))
    assert chats[1]["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION},
                                    {"role": "assistant", "content": f"a{SEP}b wrong{SEP}"}]
    assert chats[1]["add_generation_prompt"] is False


async def test_base_url_under_v1_still_reaches_the_root_pooling_route():
    with FakePRM() as fake:
        prm = PRMClient(PRMOptions(base_url=fake.base_url + "/v1/", model=fake.model))
        assert await prm.score(metered(), QUESTION, [["a"]]) == [[0.9]]


async def test_one_score_per_step_the_right_probability():
    with FakePRM(score=lambda q, step: {"one": 0.75, "two": 0.25}.get(step, 0.5)) as fake:
        scores = await client(fake).score(metered(), QUESTION, [["one", "two", "three"]])
    assert scores == [[0.75, 0.25, 0.5]]


async def test_a_separator_inside_a_step_is_taken_out_and_steps_are_stripped():
    with FakePRM() as fake:
        scores = await client(fake).score(metered(), QUESTION, [[f"x {SEP} y\n\n", "  z  "]])
        text = fake.billing.bodies[0]["input"]
    assert scores == [[0.9, 0.9]]
    assert chat_parts(text)["assistant"] == f"x  y{SEP}z{SEP}"


async def test_paths_of_one_call_share_a_request_and_prefixes_are_not_sent_apart():
    with FakePRM() as fake:
        scores = await client(fake).score(metered(), QUESTION, [["a", "b"], ["a"], ["a", "c wrong"], ["d"]])
        bodies = fake.billing.bodies
    assert scores == [[0.9, 0.9], [0.9], [0.9, pytest.approx(0.1)], [0.9]]
    assert len(bodies) == 1
    sent = [chat_parts(t)["assistant"] for t in bodies[0]["input"]]
    assert sent == [f"a{SEP}b{SEP}", f"a{SEP}c wrong{SEP}", f"d{SEP}"]  # ["a"] rides on ["a", "b"]


async def test_max_paths_per_request_splits_a_call_into_concurrent_requests():
    with FakePRM() as fake:
        scores = await client(fake, max_paths_per_request=2).score(metered(), QUESTION, [["a"], ["b"], ["c"]])
        assert len(fake.billing.bodies) == 2
    assert scores == [[0.9], [0.9], [0.9]]


async def test_cached_prefixes_cost_nothing_and_a_path_pays_for_its_new_steps_only():
    lm = metered()
    with FakePRM() as fake:
        prm = client(fake)
        await prm.score(lm, QUESTION, [["a", "b"], ["a", "c"]])
        spent = lm.ledger.spend()
        again = await prm.score(lm, QUESTION, [["a", "b"], ["a", "c"], ["a"]])
        assert fake.billing.requests == 1 and lm.ledger.spend().input_tokens == spent.input_tokens
        assert lm.ledger.spend().calls == spent.calls
        await prm.score(lm, QUESTION, [["a", "b", "d"], ["a", "c"]])
        assert fake.billing.requests == 2
        assert [chat_parts(t)["assistant"] for t in [fake.billing.bodies[1]["input"]]] == [f"a{SEP}b{SEP}d{SEP}"]
        other = await prm.score(lm, "Another question", [["a"]])  # the cache is per question
        assert fake.billing.requests == 3
    assert again == [[0.9, 0.9], [0.9, 0.9], [0.9]] and other == [[0.9]]


async def test_usage_is_charged_to_the_ledger_as_scoring():
    lm = metered(Budget(usd=1.0))
    with FakePRM() as fake:
        prm = client(fake, input_price_per_mtok=2.0)
        await prm.score(lm, QUESTION, [["a", "b"], ["c"]])
        billed = fake.billing.prompt_tokens
    spend = lm.ledger.spend()
    assert billed > 0 and spend.input_tokens == billed and spend.output_tokens == 0
    assert (spend.generations, spend.scorer_generations, spend.calls) == (0, 2, 1)
    assert float(spend.usd) == pytest.approx(billed * 2.0 / 1e6)
    assert not spend.estimated
    [record] = lm.ledger.trace
    assert (record.kind, record.model, record.n_granted) == ("scorer", "fake-prm", 2)
    assert record.latency_s > 0
    assert lm.ledger.remaining().usd == pytest.approx(1.0 - billed * 2.0 / 1e6)  # no reservation left


async def test_missing_usage_charges_the_bound_marked_estimated():
    lm = metered()
    with FakePRM(faults=["nousage"]) as fake:
        prm = client(fake)
        assert await prm.score(lm, QUESTION, [["a"]]) == [[0.9]]
        text = fake.billing.bodies[0]["input"]
    spend = lm.ledger.spend()
    assert spend.estimated and spend.input_tokens >= len(text.encode())
    assert "no usage" in lm.ledger.trace[0].notes[0]


async def test_the_ledger_refusing_sends_nothing():
    lm = metered(Budget(input_tokens=20))
    with FakePRM() as fake, pytest.raises(BudgetExhausted, match="input_tokens"):
        await client(fake).score(lm, QUESTION, [["a long step " * 10]])
    assert fake.billing.requests == 0
    assert lm.ledger.spend().input_tokens == 0


@pytest.mark.parametrize(("fault", "message", "charged"), [
    ("400", "rejected the request: HTTP 400", False),
    ("404", "HTTP 404", False),
    ("malformed", "malformed body", True),
    ("short", "1 scores for 2 steps", True),
    ("extra", "3 scores for 2 steps", True),
    ("noindex", "bad item", True),
    ("badprob", "not a probability pair", True),
])
async def test_errors_fail_the_paths_clearly_and_are_never_scores(fault, message, charged):
    lm = metered()
    with FakePRM(faults=[fault]) as fake:
        prm = client(fake)
        with pytest.raises(ProcessScoringFailed, match=message) as info:
            await prm.score(lm, QUESTION, [["a", "b"]])
        assert info.value.step_scores == [[None, None]]
        assert (lm.ledger.spend().input_tokens > 0) == charged
        assert len(prm.cache) == 0
        assert await prm.score(lm, QUESTION, [["a", "b"]]) == [[0.9, 0.9]]  # asked again: nothing was kept
    assert lm.ledger.remaining().input_tokens == 1_000_000 - lm.ledger.spend().input_tokens


async def test_one_bad_reply_fails_only_its_own_paths():
    with FakePRM(faults=["short"]) as fake:
        prm = client(fake, request_format="messages", max_concurrency=1)
        with pytest.raises(ProcessScoringFailed) as info:
            await prm.score(metered(), QUESTION, [["a", "b"], ["c"]])
    assert info.value.step_scores in ([[None, None], [0.9]], [[0.9, 0.9], [None]])


async def test_server_errors_are_retried_and_then_reported():
    with FakePRM(faults=["500", "429"]) as fake:
        lm = metered()
        assert await client(fake, backoff_s=0.01).score(lm, QUESTION, [["a"]]) == [[0.9]]
        assert fake.billing.requests == 3
        assert "2 failed attempt(s) retried" in lm.ledger.trace[0].notes[-1]
    with FakePRM(faults=["500"] * 3) as fake:
        lm = metered()
        with pytest.raises(ProcessScoringFailed, match="failed after 3 attempt"):
            await client(fake, backoff_s=0.01, max_retries=2).score(lm, QUESTION, [["a"]])
        assert lm.ledger.spend().input_tokens == 0  # nothing was computed


async def test_a_hang_past_the_timeout_is_an_error_charged_its_worst_case():
    lm = metered()
    with FakePRM(faults=["timeout"], timeout_sleep_s=1.0) as fake, \
            pytest.raises(ProcessScoringFailed, match=r"no complete reply within 0\.2 s"):
        await client(fake, timeout_s=0.2).score(lm, QUESTION, [["a"]])
    spend = lm.ledger.spend()
    assert spend.estimated and spend.input_tokens > 0


async def test_an_unreachable_server_is_a_clear_error():
    from tests.conftest import free_port

    prm = PRMClient(PRMOptions(base_url=f"http://127.0.0.1:{free_port()}", model="m", max_retries=1, backoff_s=0.01))
    with pytest.raises(ProcessScoringFailed, match=r"failed after 2 attempt.*ConnectError"):
        await prm.score(metered(), QUESTION, [["a"]])


def test_options_are_checked():
    with pytest.raises(ConfigError, match="http"):
        PRMOptions(base_url="localhost:8000", model="m")
    with pytest.raises(ConfigError, match="request_format"):
        PRMOptions(base_url="http://x", model="m", request_format="chat")
    with pytest.raises(ConfigError, match="separator"):
        PRMOptions(base_url="http://x", model="m", step_separator="")
