from fractions import Fraction

import pytest

from apportion.budget import Ask, Budget, Ledger, Price, PriceTable, Usage
from apportion.errors import BudgetError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- Budget ------------------------------------------------------------------------------------


def test_budget_parse_plain_number_is_generations():
    assert Budget.parse("8") == Budget(generations=8)
    assert Budget.parse(8) == Budget(generations=8)


def test_budget_parse_units_and_aliases():
    b = Budget.parse("gen=8, tokens=4000, usd=0.02, s=30, in=100, out=200")
    assert b == Budget(generations=8, total_tokens=4000, usd=0.02, seconds=30, input_tokens=100,
                       output_tokens=200)
    assert Budget.parse(str(b)) == b


@pytest.mark.parametrize("text, message", [
    ("0", "must be > 0"),
    ("-3", "must be > 0"),
    ("2.5", "whole number"),
    ("gen=8,gen=9", "given twice"),
    ("bananas=3", "unknown budget unit 'bananas'"),
    ("tokens=lots", "must be a number"),
    ("", "empty budget"),
    ("usd=nan", "must be > 0"),
])
def test_budget_parse_rejects_bad_input_by_name(text, message):
    with pytest.raises(BudgetError, match=message):
        Budget.parse(text)


def test_budget_needs_a_limit():
    with pytest.raises(BudgetError, match="at least one limit"):
        Budget()


def test_price_parse_and_cost_exact():
    p = Price.parse("0.15,0.6")
    assert p == Price(0.15, 0.6) == Price.parse("in=0.15,out=0.6")
    assert p.cost(1_000_000, 1_000_000) == Fraction(75, 100)
    assert p.cost(1, 0) == Fraction(15, 100_000_000)
    with pytest.raises(BudgetError):
        Price.parse("0.15")
    with pytest.raises(BudgetError):
        Price(-1, 0)


def test_price_table_prefix_lookup_and_override():
    table = PriceTable()
    assert table.lookup("gpt-4o-mini-2024-07-18") == table.lookup("gpt-4o-mini")
    assert table.lookup("gpt-4o-2024-08-06") == table.lookup("gpt-4o")
    assert table.lookup("no-such-model") is None
    assert table.with_price("local", Price(1, 2)).lookup("local") == Price(1, 2)


def test_price_table_from_json(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text('{"mine": [1, 2], "other": {"input": 3, "output": 4}}')
    table = PriceTable.from_json(path)
    assert table.lookup("mine") == Price(1, 2) and table.lookup("other") == Price(3, 4)
    path.write_text('{"bad": 5}')
    with pytest.raises(BudgetError, match="'bad'"):
        PriceTable.from_json(path)


# -- Ledger: clamping ------------------------------------------------------------------------


def test_reserve_clamps_n_to_generations_left():
    ledger = Ledger(Budget(generations=5))
    grant = ledger.reserve(Ask(n=8, max_tokens=100, prompt_tokens=10))
    assert grant is not None and grant.n == 5 and grant.max_tokens == 100 and grant.clamped
    assert ledger.remaining().generations == 0
    assert ledger.reserve(Ask(n=1, max_tokens=100, prompt_tokens=10)) is None
    assert ledger.exhausted_reason.startswith("generations")


def test_reserve_prefers_full_length_samples_then_truncates_one():
    ledger = Ledger(Budget(output_tokens=250))
    grant = ledger.reserve(Ask(n=8, max_tokens=100, prompt_tokens=10))
    assert (grant.n, grant.max_tokens) == (2, 100)
    ledger.settle(grant, Usage(2, 10, 200))
    grant = ledger.reserve(Ask(n=8, max_tokens=100, prompt_tokens=10, min_tokens=20))
    assert (grant.n, grant.max_tokens) == (1, 50)
    ledger.settle(grant, Usage(1, 10, 45))
    assert ledger.reserve(Ask(n=8, max_tokens=100, prompt_tokens=10, min_tokens=20)) is None
    assert "output_tokens: 5 left" in ledger.exhausted_reason


def test_total_tokens_counts_the_prompt_once_per_request():
    shared = Ledger(Budget(total_tokens=500)).reserve(Ask(n=8, max_tokens=50, prompt_tokens=100))
    assert shared.n == 8  # 100 + 8 * 50 = 500
    ledger = Ledger(Budget(total_tokens=500))  # one request per sample: each pays for the prompt
    grants = [ledger.reserve(Ask(n=1, max_tokens=50, prompt_tokens=100)) for _ in range(8)]
    assert sum(g is not None for g in grants) == 3  # 3 * (100 + 50) = 450


def test_dollar_budget_clamps_exactly():
    price = Price(1_000_000, 2_000_000)  # $1 per input token, $2 per output token
    ledger = Ledger(Budget(usd=25))
    grant = ledger.reserve(Ask(n=4, max_tokens=5, prompt_tokens=5, price=price))
    assert (grant.n, grant.max_tokens) == (2, 5)  # 5 + 2*2*5 = 25
    ledger.settle(grant, Usage(2, 5, 10))
    assert ledger.spend().usd == 25
    assert ledger.reserve(Ask(n=1, max_tokens=5, prompt_tokens=5, price=price)) is None
    assert ledger.exhausted_reason.startswith("usd")


def test_input_tokens_limit_refuses_prompt_too_large():
    ledger = Ledger(Budget(input_tokens=50))
    assert ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=60)) is None
    assert "input_tokens" in ledger.exhausted_reason


def test_scorer_calls_do_not_use_generations_but_pay_tokens():
    ledger = Ledger(Budget(generations=2, total_tokens=1000))
    g = ledger.reserve(Ask(n=2, max_tokens=10, prompt_tokens=10))
    ledger.settle(g, Usage(2, 10, 20))
    judge = ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=50, kind="scorer"))
    assert judge is not None
    ledger.settle(judge, Usage(1, 50, 5))
    spend = ledger.spend()
    assert (spend.generations, spend.scorer_generations, spend.total_tokens) == (2, 1, 85)


def test_settle_returns_unused_reservation_and_release_returns_all():
    ledger = Ledger(Budget(output_tokens=100))
    g = ledger.reserve(Ask(n=1, max_tokens=100, prompt_tokens=0))
    assert ledger.remaining().output_tokens == 0
    ledger.settle(g, Usage(1, 0, 30))
    assert ledger.remaining().output_tokens == 70
    g2 = ledger.reserve(Ask(n=1, max_tokens=70, prompt_tokens=0))
    ledger.release(g2)
    assert ledger.remaining().output_tokens == 70
    with pytest.raises(BudgetError, match="twice"):
        ledger.release(g2)
    with pytest.raises(BudgetError, match="twice"):
        ledger.settle(g, Usage())


def test_overrun_is_charged_as_reported():
    ledger = Ledger(Budget(output_tokens=100))
    g = ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=0))
    ledger.settle(g, Usage(1, 0, 15))  # a server that ignored max_tokens
    assert ledger.spend().output_tokens == 15


def test_deadline_refuses_after_time_is_up():
    clock = FakeClock()
    ledger = Ledger(Budget(seconds=10), clock=clock)
    assert ledger.seconds_left() == 10
    assert ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=0)) is not None
    clock.now += 10
    assert ledger.reserve(Ask(n=1, max_tokens=10, prompt_tokens=0)) is None
    assert ledger.exhausted_reason.startswith("seconds")
    assert ledger.spend().seconds == 10


def test_child_ledger_rolls_up_and_respects_parent():
    clock = FakeClock()
    parent = Ledger(Budget(generations=10, seconds=5), clock=clock)
    child = parent.child(Budget(generations=8))
    g = child.reserve(Ask(n=8, max_tokens=10, prompt_tokens=4))
    child.settle(g, Usage(8, 4, 80))
    other = parent.child(Budget(generations=8))
    g2 = other.reserve(Ask(n=8, max_tokens=10, prompt_tokens=4))
    assert g2.n == 2  # the parent has only 2 left
    other.settle(g2, Usage(2, 4, 20))
    assert parent.spend().generations == 10 and parent.spend().output_tokens == 100
    assert child.spend().generations == 8
    assert child.deadline() == parent.deadline() == 105
    assert len(parent.trace) == 0  # no records were passed; records roll up only when given


# -- tool calls ------------------------------------------------------------------------------


def test_tool_calls_parse_format_and_serialise():
    b = Budget.parse("gen=8,tool_calls=4")
    assert b == Budget(generations=8, tool_calls=4) == Budget.parse("gen=8, tools=4") == Budget.parse("gen=8,tool=4")
    assert Budget.parse(str(b)) == b and str(b) == "generations=8,tool_calls=4"
    assert b.to_dict()["tool_calls"] == 4 and Budget(generations=1).to_dict()["tool_calls"] is None
    assert Budget.parse("tool_calls=3").limits() == {"tool_calls": 3}
    with pytest.raises(BudgetError, match="whole number"):
        Budget.parse("tool_calls=1.5")
    with pytest.raises(BudgetError, match="must be > 0"):
        Budget(tool_calls=0)


def test_tool_runs_are_reserved_and_settled_apart_from_samples():
    ledger = Ledger(Budget(generations=2, total_tokens=100, tool_calls=3))
    g = ledger.reserve(Ask(n=2, max_tokens=10, prompt_tokens=10))
    assert ledger.remaining().tool_calls == 3  # a sample takes no tool call
    tools = ledger.reserve(Ask.tool(5))
    assert (tools.n, tools.kind, tools.clamped, tools.worst) == (3, "tool", True, Usage(tool_calls=3))
    assert ledger.remaining().tool_calls == 0 and ledger.remaining().total_tokens == 70  # no tokens reserved
    assert ledger.reserve(Ask.tool()) is None and ledger.exhausted_reason == "tool_calls: none left"
    with pytest.raises(BudgetError, match="tool calls"):
        ledger.settle(tools, Usage(tool_calls=4))
    ledger.settle(tools, Usage(tool_calls=2))
    ledger.settle(g, Usage(2, 10, 20))
    spend = ledger.spend()
    assert (spend.tool_calls, spend.generations, spend.total_tokens, spend.calls) == (2, 2, 30, 2)
    assert spend.to_dict()["tool_calls"] == 2 and ledger.remaining().tool_calls == 1
    assert not spend.violations(Budget(tool_calls=2))
    assert spend.violations(Budget(tool_calls=1)) == ["tool_calls: 2 > 1"]


def test_tool_runs_are_unlimited_without_a_tool_limit_but_stop_at_the_deadline():
    clock = FakeClock()
    ledger = Ledger(Budget(generations=1, seconds=5), clock=clock)
    grant = ledger.reserve(Ask.tool(50))
    assert grant.n == 50 and ledger.remaining().generations == 1
    ledger.release(grant)
    clock.now += 5
    assert ledger.reserve(Ask.tool()) is None and ledger.exhausted_reason.startswith("seconds")


def test_a_tool_ask_asks_for_no_tokens_and_a_parent_limit_binds_a_child():
    with pytest.raises(BudgetError, match="invalid ask"):
        Ask(n=1, max_tokens=10, prompt_tokens=0, kind="tool")
    with pytest.raises(BudgetError, match="invalid ask"):
        Ask(n=1, max_tokens=0, prompt_tokens=0)
    parent = Ledger(Budget(tool_calls=2))
    child = parent.child(Budget(tool_calls=5))
    grant = child.reserve(Ask.tool(4))
    assert grant.n == 2
    child.settle(grant, Usage(tool_calls=2))
    assert parent.spend().tool_calls == child.spend().tool_calls == 2
    assert child.reserve(Ask.tool()) is None and child.exhausted_reason.startswith("parent budget: tool_calls")
