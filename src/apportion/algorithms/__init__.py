"""Test-time algorithms: one per module, all sharing the base sampling loop and voting."""

from apportion.algorithms.base import Algorithm, SamplingOptions
from apportion.algorithms.beam_search import BeamSearch, BeamSearchOptions
from apportion.algorithms.best_of_n import BestOfN, BestOfNOptions
from apportion.algorithms.budget_forcing import BudgetForcing, BudgetForcingOptions
from apportion.algorithms.dvts import DVTS, DVTSOptions
from apportion.algorithms.program_aided import ProgramAided, ProgramAidedOptions
from apportion.algorithms.prompting import ChainOfDraft, Tale, parse_prompt_mode
from apportion.algorithms.registry import ALGORITHMS, make_algorithm
from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
from apportion.algorithms.steps import StepOptions

__all__ = ["ALGORITHMS", "DVTS", "Algorithm", "BeamSearch", "BeamSearchOptions", "BestOfN", "BestOfNOptions",
           "BudgetForcing", "BudgetForcingOptions", "ChainOfDraft", "DVTSOptions", "ProgramAided",
           "ProgramAidedOptions", "SamplingOptions", "SelfConsistency", "SelfConsistencyOptions", "StepOptions",
           "Tale", "make_algorithm", "parse_prompt_mode"]
