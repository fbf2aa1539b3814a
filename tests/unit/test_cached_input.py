"""Cached input prices: prompt tokens a server served from its prefix cache are read from its
replies, charged at the cached price when a call settles, and shown in the spend; reservations
(made before anyone knows what will be cached) keep charging every input token the full price."""

from __future__ import annotations

import json
from fractions import Fraction

import httpx
import pytest

from apportion import Budget, HTTPOptions, OpenAIHTTPBackend, Prompt, SamplingParams, SelfConsistency
from apportion.allocate.models import ModelSpec, parse_models, parse_price
from apportion.budget import Ask, Ledger, Price, PriceTable, Usage
from apportion.budget.prices import BUILTIN_PRICES
from apportion.errors import BudgetError, ConfigError
from apportion.lm.http_reply import read_reply
from apportion.lm.metered import MeteredLM
from apportion.lm.scripted import ScriptedBackend
from apportion.serve import ServedApp, openai_app

# $1 per input token, $0.25 per cached input token, $2 per output token: every figure is a whole number
DISCOUNTED = Price(1_000_000, 2_000_000, 250_000)

# -- Price -------------------------------------------------------------------------------------


def test_price_parse_reads_a_cached_input_price_in_both_forms():
    p = Price(0.15, 0.6, 0.075)
    assert Price.parse("in=0.15,cached=0.075,out=0.6") == p
    assert Price.parse("0.15,0.075,0.6") == p  # as vendors list them: input, cached input, output
    assert Price.parse("out=0.6, cached_input=0.075, input=0.15") == p
    assert Price.parse(p.to_text()) == p
    plain = Price.parse("0.15,0.6")
    assert plain == Price(0.15, 0.6) and plain.cached_input_per_mtok is None
    assert Price.parse(plain.to_text()) == plain


@pytest.mark.parametrize("text, message", [
    ("in=0.15,cached=0.075", "expected"),  # no output price
    ("0.15,0.075,0.6,1", "expected"),
    ("in=0.15,cached=0.1,cached=0.2", "expected"),
    ("0.15,lots,0.6", "must be a number"),
    ("0.15,0.3,0.6", "must not exceed"),  # a cached price above the input price
    ("0.15,-0.01,0.6", ">= 0"),
    ("0.15,nan,0.6", ">= 0"),
])
def test_price_parse_refuses_bad_cached_prices(text, message):
    with pytest.raises(BudgetError, match=message):
        Price.parse(text)


def test_cost_charges_cached_tokens_the_cached_price_exactly():
    p = Price(2.50, 10.00, 1.25)
    assert p.cost(1_000_000, 0, 400_000) == Fraction(600_000 * 250 + 400_000 * 125, 100 * 10**6)  # $2.00
    assert p.cost(1_000_000, 0, 400_000) == 2
    assert p.cost(3, 7) == p.cost(3, 7, 0) == Price(2.50, 10.00).cost(3, 7)  # nothing cached: full price
    assert Price(0.15, 0.6).cost(10, 0, 10) == Price(0.15, 0.6).cost(10, 0)  # no cached price: input price
    assert Price(0.15, 0.6, 0.0).cost(10, 5, 10) == Price(0.15, 0.6).cost(0, 5)  # cached tokens free
    assert DISCOUNTED.charge(Usage(1, 10, 3, cached_input_tokens=4)) == 6 + 1 + 6
    with pytest.raises(BudgetError, match="cached input tokens"):
        p.cost(3, 0, 4)
    with pytest.raises(BudgetError, match="cached input tokens"):
        p.cost(3, 0, -1)


def test_usage_carries_cached_tokens_last_and_sums_them():
    u = Usage(1, 10, 5, True, 2)  # the positional order of the other fields is unchanged
    assert (u.generations, u.input_tokens, u.output_tokens, u.estimated, u.tool_calls,
            u.cached_input_tokens) == (1, 10, 5, True, 2, 0)
    total = Usage(1, 10, 5, cached_input_tokens=4) + Usage(2, 20, 6, cached_input_tokens=20)
    assert total == Usage(3, 30, 11, cached_input_tokens=24)
    with pytest.raises(BudgetError, match="cached input tokens"):
        Usage(1, 10, 5, cached_input_tokens=11)


def test_price_tables_and_models_files_carry_cached_prices(tmp_path):
    assert BUILTIN_PRICES["gpt-4o-mini"] == Price(0.15, 0.60, 0.075)
    assert all(p.cached_input_per_mtok is not None for p in BUILTIN_PRICES.values())
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"three": [1, 0.5, 2], "keyed": {"input": 3, "cached": 1, "output": 4},
                                "plain": [5, 6]}))
    table = PriceTable.from_json(path)
    assert table.lookup("three") == Price(1, 2, 0.5)
    assert table.lookup("keyed") == Price(3, 4, 1)
    assert table.lookup("plain") == Price(5, 6)
    path.write_text(json.dumps({"dear-cache": [1, 2, 3]}))
    with pytest.raises(BudgetError, match=r"'dear-cache'.*must not exceed"):
        PriceTable.from_json(path)

    assert parse_price("0.4,0.1,1.6") == parse_price([0.4, 0.1, 1.6]) == Price(0.4, 1.6, 0.1)
    assert parse_price({"input": 0.4, "cached": 0.1, "output": 1.6}) == Price(0.4, 1.6, 0.1)
    with pytest.raises(ConfigError):
        parse_price({"input": 0.4, "cachd": 0.1, "output": 1.6})
    spec = ModelSpec("m", Price(0.4, 1.6, 0.1))
    assert spec.to_dict()["price"] == [0.4, 0.1, 1.6]
    assert parse_models([spec.to_dict()])[0] == spec
    assert ModelSpec("m", Price(0.4, 1.6)).to_dict()["price"] == [0.4, 1.6]  # unchanged without one


# -- Ledger ------------------------------------------------------------------------------------


def test_a_reservation_charges_the_full_input_price_and_settling_the_cached_one():
    ledger = Ledger(Budget(usd=25))
    grant = ledger.reserve(Ask(n=4, max_tokens=5, prompt_tokens=5, price=DISCOUNTED))
    # the same clamp as without a cached price: 5 input tokens at $1 + 2 samples x 5 tokens x $2
    assert (grant.n, grant.max_tokens) == (2, 5)
    assert grant.worst_usd == 25 == Price(1_000_000, 2_000_000).cost(5, 10)
    assert ledger.remaining().usd == 0
    usd = ledger.settle(grant, Usage(2, 5, 10, cached_input_tokens=4))
    assert usd == 4 * Fraction(1, 4) + 1 + 20  # 4 cached at $0.25, 1 at $1, 10 output at $2
    spent = ledger.spend()
    assert spent.usd == Fraction(22) and spent.cached_input_tokens == 4 and spent.input_tokens == 5
    assert ledger.remaining().usd == 3
    assert spent.to_dict()["cached_input_tokens"] == 4 and spent.to_dict()["usd"] == 22.0
    # what remains is again reserved at full price: a 5-token prompt no longer fits in $3 with a sample
    assert ledger.reserve(Ask(n=1, max_tokens=1, prompt_tokens=2, price=DISCOUNTED)) is None
    assert ledger.reserve(Ask(n=1, max_tokens=1, prompt_tokens=1, price=DISCOUNTED)) is not None


def test_child_ledgers_roll_up_cached_tokens_and_discounted_dollars():
    parent = Ledger(Budget(usd=100))
    child = parent.child(Budget(usd=50))
    grant = child.reserve(Ask(n=1, max_tokens=5, prompt_tokens=8, price=DISCOUNTED))
    assert grant.worst_usd == 8 + 10
    assert parent.remaining().usd == 100 - 18
    child.settle(grant, Usage(1, 8, 5, cached_input_tokens=8))
    for ledger in (parent, child):
        assert ledger.spend().usd == 2 + 10 and ledger.spend().cached_input_tokens == 8


def test_a_servers_overrun_with_cached_tokens_is_priced_within_the_calls_charge():
    """Input tokens past the reservation are priced as uncached first, so the run's own share of a
    call's dollars (its charge less the overrun's) never passes what was reserved for it."""
    ledger = Ledger(Budget(usd=1000))
    grant = ledger.reserve(Ask(n=1, max_tokens=5, prompt_tokens=10, price=DISCOUNTED))
    usd = ledger.settle(grant, Usage(1, 14, 5, cached_input_tokens=12))  # 4 tokens more than reserved
    assert usd == 2 + 12 * Fraction(1, 4) + 10
    over = ledger.spend().overrun
    assert (over.input_tokens, over.output_tokens, over.calls) == (4, 0, 1)
    assert over.usd == 2 + 2 * Fraction(1, 4)  # the 2 uncached tokens, then 2 of the cached ones
    assert usd - over.usd <= grant.worst_usd


async def test_a_metered_call_records_its_cached_tokens_in_the_trace():
    lm = ScriptedBackend(["the answer is 7"], price=DISCOUNTED, cached_prompt_tokens=4)
    metered = MeteredLM(lm, Ledger(Budget(usd=1000)))
    completion = await metered.generate(Prompt.chat("What is 3 + 4?"), SamplingParams(n=2, max_tokens=8))
    prompt = await lm.prompt_tokens(Prompt.chat("What is 3 + 4?"))
    assert completion.usage.cached_input_tokens == 4 and completion.usage.input_tokens == prompt
    record = metered.ledger.trace[0]
    assert record.to_dict()["cached_input_tokens"] == 4
    assert record.usd == float(DISCOUNTED.cost(prompt, 8, 4))
    assert metered.ledger.spend().usd == DISCOUNTED.cost(prompt, 8, 4) < DISCOUNTED.cost(prompt, 8)


# -- replies -----------------------------------------------------------------------------------


def chat_reply(usage: dict | None) -> dict:
    body: dict = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "The answer is 7."}, "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return body


def completions_reply(usage: dict) -> dict:
    return {"object": "text_completion", "usage": usage, "choices": [
        {"index": 0, "text": "The answer is 7.", "finish_reason": "stop",
         "logprobs": {"token_logprobs": [-0.1] * 5}}]}


def counts(prompt: int, completion: int, cached: object = None) -> dict:
    out: dict = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


@pytest.mark.parametrize("make", [chat_reply, completions_reply])
def test_cached_tokens_are_read_from_chat_and_completions_replies(make):
    reply = read_reply(make(counts(120, 5, 96)), SamplingParams(max_tokens=16), 130)
    assert reply.usage == Usage(1, 120, 5, cached_input_tokens=96)
    assert reply.notes == ()
    assert read_reply(make(counts(120, 5)), SamplingParams(max_tokens=16), 130).usage.cached_input_tokens == 0


@pytest.mark.parametrize("cached", ["96", True, -3, 2.5, float("nan"), 10**12, None, [96], {"n": 96}])
def test_cached_tokens_that_are_not_a_count_are_ignored(cached):
    usage = counts(120, 5)
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    reply = read_reply(chat_reply(usage), SamplingParams(max_tokens=16), 130)
    assert reply.usage == Usage(1, 120, 5)
    usage["prompt_tokens_details"] = cached  # not even an object
    assert read_reply(chat_reply(usage), SamplingParams(max_tokens=16), 130).usage == Usage(1, 120, 5)


def test_more_cached_tokens_than_prompt_tokens_are_cut_to_the_prompt_with_a_note():
    reply = read_reply(chat_reply(counts(120, 5, 150)), SamplingParams(max_tokens=16), 130)
    assert reply.usage.cached_input_tokens == 120
    assert any("150 cached prompt tokens of 120" in note for note in reply.notes)
    assert read_reply(chat_reply(counts(120, 5, 96.0)), SamplingParams(max_tokens=16), 130).usage \
        .cached_input_tokens == 96  # a whole float is a count


def test_no_reported_prompt_count_means_no_discount():
    """Without a prompt count the prompt is charged its reserved bound at full price: a cached
    count cannot be a part of a figure the server did not give."""
    usage = {"completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 96}}
    reply = read_reply(chat_reply(usage), SamplingParams(max_tokens=16), 130)
    assert reply.usage == Usage(1, 130, 5, True)


# -- over HTTP, end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_server():
    lm = ScriptedBackend(["Adding them gives 7. The answer is 7."], model="cached-model", cached_prompt_tokens=6)
    with ServedApp(openai_app(lm)) as served:
        yield lm, served


def test_the_server_reports_cached_tokens_as_openai_does(cached_server):
    _, served = cached_server
    for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": "What is 3 + 4?"}]}),
                       ("/completions", {"prompt": "Q: What is 3 + 4? A: the sum of three and four"})):
        r = httpx.post(served.base_url + path, json={"model": "cached-model", "max_tokens": 8, **body}, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 6}


@pytest.mark.parametrize("prompt", [Prompt.chat("What is 3 + 4?"),
                                    Prompt.raw("Q: What is 3 + 4? A: the sum of three and four")])
async def test_dollar_spend_over_http_charges_the_servers_cached_tokens_at_the_discount(cached_server, prompt):
    _, served = cached_server
    price = Price(1.0, 4.0, 0.1)
    lm = OpenAIHTTPBackend(HTTPOptions(base_url=served.base_url, model="cached-model", price=price,
                                       backoff_s=0.01, timeout_s=5))
    try:
        result = await SelfConsistency().run(lm, prompt, Budget(generations=3, usd=1.0), seed=1)
    finally:
        await lm.aclose()
    spent = result.spent
    assert spent.calls >= 1 and spent.cached_input_tokens == 6 * spent.calls
    assert spent.usd == price.cost(spent.input_tokens, spent.output_tokens, spent.cached_input_tokens)
    assert spent.usd < price.cost(spent.input_tokens, spent.output_tokens)
    out = result.to_dict()
    assert out["spent"]["cached_input_tokens"] == spent.cached_input_tokens
    assert [t["cached_input_tokens"] for t in out["trace"]] == [6] * spent.calls
