"""Spending a budget across prompts: scaling laws and greedy marginal-gain allocation (and, next,
difficulty estimation and the allocation policies built on them)."""

from apportion.allocate.greedy import Allocation, LawModel, PassAtK, SuccessModel, allocate
from apportion.allocate.scaling import Fit, FitCache, Prediction, ScalingLaw, fit, fit_law

__all__ = ["Allocation", "Fit", "FitCache", "LawModel", "PassAtK", "Prediction", "ScalingLaw", "SuccessModel",
           "allocate", "fit", "fit_law"]
