"""Token counts for a bank that stored none (the shared MATH bank records texts only).

Without them every token figure of a replay is 0 and a stopping rule's share of the full budget's
tokens is 0/0. The counts filled in here come from a tokenizer the caller gives (the embedded
model's, in ``apportion bench``), so they are estimates: the entries are flagged ``estimated`` and
the bank's metadata names the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from apportion.banks.bank import BankEntry, SampleBank

ESTIMATED_KEY = "tokens_estimated"
"""The bank metadata that says its token counts were estimated, and how."""


def missing_token_counts(bank: SampleBank) -> int:
    """Samples with text but no output tokens recorded."""
    return sum(1 for e in bank.entries for s in e.samples if s.output_tokens == 0 and s.text)


def count_missing_tokens(bank: SampleBank, count: Callable[[str], int], tokenizer: str) -> SampleBank:
    """The bank with each sample that has text but 0 output tokens counted by ``count``; the entries
    touched are flagged ``estimated`` and ``meta[ESTIMATED_KEY]`` says which tokenizer counted how
    many samples. The prompt tokens are left as they are: the prompt a bank's samples answered is
    not always known (the MATH bank's is not)."""
    counted = 0

    def filled(entry: BankEntry) -> BankEntry:
        nonlocal counted
        missing = [i for i, s in enumerate(entry.samples) if s.output_tokens == 0 and s.text]
        if not missing:
            return entry
        samples = list(entry.samples)
        for i in missing:
            samples[i] = replace(samples[i], output_tokens=count(samples[i].text))
        counted += len(missing)
        return replace(entry, samples=tuple(samples), estimated=True)

    entries = [filled(e) for e in bank.entries]
    if not counted:
        return bank
    note: dict[str, Any] = {"tokenizer": tokenizer, "samples": counted,
                            "why": "the bank stored no output token counts for them"}
    return SampleBank(entries, {**bank.meta, ESTIMATED_KEY: note})
