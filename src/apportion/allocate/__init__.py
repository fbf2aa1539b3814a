"""Spending one budget across prompts: difficulty estimates, policies, the batch engine (a parent
ledger with a child per prompt, rounds at barriers), scaling laws and greedy marginal-gain
allocation."""

from apportion.allocate.greedy import Allocation, LawModel, PassAtK, SuccessModel, allocate
from apportion.allocate.scaling import Fit, FitCache, Prediction, ScalingLaw, fit, fit_law

__all__ = ["Allocation", "Fit", "FitCache", "LawModel", "PassAtK", "Prediction", "ScalingLaw", "SuccessModel",
           "allocate", "fit", "fit_law"]
