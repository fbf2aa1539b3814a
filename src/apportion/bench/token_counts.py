"""Token counts for a given bank that has none, from the embedded model's tokenizer.

``apportion bench --bank`` calls this before replaying: a bank without counts (the shared MATH
bank) then gets estimated ones, flagged as such, instead of 0 tokens everywhere. Without
llama-cpp-python (or the model file) the bank is left as it is and the caller is told why.
"""

from __future__ import annotations

from apportion.banks import SampleBank, count_missing_tokens, missing_token_counts
from apportion.errors import ModelNotFound
from apportion.lm.llama_embedded import embedded_tokenizer


def fill_token_counts(bank: SampleBank, model_path: str | None = None) -> tuple[SampleBank, str | None]:
    """The bank with its missing output token counts estimated by the tokenizer of ``model_path``
    (default: the embedded model), and None; or the bank unchanged and the reason it could not be."""
    missing = missing_token_counts(bank)
    if not missing:
        return bank, None
    try:
        tokenizer = embedded_tokenizer(model_path)
    except ModelNotFound as exc:
        return bank, (f"{missing} samples of the bank have no token counts and they cannot be estimated ({exc}); "
                      "their tokens count as 0, so there are no token shares")
    return count_missing_tokens(bank, tokenizer.count, tokenizer.name), None
