"""Scorers: outcome scores for candidates (self-certainty, LLM-as-judge)."""

from apportion.reward.base import OutcomeScorer
from apportion.reward.judge import JudgeOptions, LLMJudge, parse_judge_score
from apportion.reward.self_certainty import SelfCertainty

SCORERS = {"self-certainty": SelfCertainty, "logprob": SelfCertainty, "judge": LLMJudge}

__all__ = ["SCORERS", "JudgeOptions", "LLMJudge", "OutcomeScorer", "SelfCertainty", "parse_judge_score"]
