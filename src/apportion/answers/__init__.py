"""Answer extraction, normalisation and equivalence."""

from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import Extracted, extract_answer, last_boxed, read_answer
from apportion.answers.normalize import format_number, normalize_answer, numeric_value

__all__ = ["Equivalence", "Extracted", "extract_answer", "format_number", "last_boxed",
           "normalize_answer", "numeric_value", "read_answer"]
