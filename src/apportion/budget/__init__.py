"""Budgets, prices and the reserve/settle ledger that enforces them."""

from apportion.budget.ledger import Ask, CallRecord, Grant, Ledger, Remaining
from apportion.budget.prices import PriceTable
from apportion.budget.units import Budget, Price, Spend, Usage

__all__ = ["Ask", "Budget", "CallRecord", "Grant", "Ledger", "Price", "PriceTable", "Remaining", "Spend", "Usage"]
