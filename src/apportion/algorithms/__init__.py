"""Test-time algorithms: one per module, all sharing the base sampling loop and voting."""

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.budget_forcing import BudgetForcing, BudgetForcingOptions
from apportion.algorithms.program_aided import ProgramAided, ProgramAidedOptions
from apportion.algorithms.prompting import ChainOfDraft, Tale, parse_prompt_mode
from apportion.algorithms.registry import ALGORITHMS, make_algorithm
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions

__all__ = ["ALGORITHMS", "Algorithm", "BestOfN", "BestOfNOptions", "BudgetForcing", "BudgetForcingOptions",
           "ChainOfDraft", "ProgramAided", "ProgramAidedOptions", "SamplingOptions", "SelfConsistency",
           "SelfConsistencyOptions", "Tale", "make_algorithm", "parse_prompt_mode"]
