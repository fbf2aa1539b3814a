"""Spending a budget across prompts: scaling laws (and, next, difficulty and allocation policies)."""

from apportion.allocate.scaling import Fit, FitCache, Prediction, ScalingLaw, fit, fit_law

__all__ = ["Fit", "FitCache", "Prediction", "ScalingLaw", "fit", "fit_law"]
