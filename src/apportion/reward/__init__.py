"""Scorers: outcome scores for candidates (self-certainty, LLM-as-judge) and process scores for
the step prefixes of a search's paths."""

from apportion.reward.base import OutcomeScorer
from apportion.reward.judge import JudgeOptions, LLMJudge, parse_judge_score
from apportion.reward.process import AGGREGATIONS, PrefixScoreCache, ProcessScorer, aggregate, score_paths
from apportion.reward.self_certainty import SelfCertainty

SCORERS = {"self-certainty": SelfCertainty, "logprob": SelfCertainty, "judge": LLMJudge}

__all__ = [
    "AGGREGATIONS",
    "SCORERS",
    "JudgeOptions",
    "LLMJudge",
    "OutcomeScorer",
    "PrefixScoreCache",
    "ProcessScorer",
    "SelfCertainty",
    "aggregate",
    "parse_judge_score",
    "score_paths",
]
