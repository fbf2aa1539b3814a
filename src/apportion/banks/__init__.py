"""Sample banks: the data model and file reading, below ``bench/`` so that ``lm/`` (replay) and
``serve/`` can use them without importing the benchmark harness."""

from apportion.banks.bank import (
    BANK_VERSION,
    BankEntry,
    BankSample,
    BankWriter,
    SampleBank,
    bank_from_samples,
    from_math_cot,
    open_bank,
)
from apportion.banks.problem import Problem
from apportion.banks.tokens import ESTIMATED_KEY, count_missing_tokens, missing_token_counts

__all__ = ["BANK_VERSION", "ESTIMATED_KEY", "BankEntry", "BankSample", "BankWriter", "Problem", "SampleBank",
           "bank_from_samples", "count_missing_tokens", "from_math_cot", "missing_token_counts", "open_bank"]
