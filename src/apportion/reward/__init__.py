"""Scorers: outcome scores for candidates (self-certainty, LLM-as-judge) and process scores for
the step prefixes of a search's paths (a PRM over HTTP, an LLM step judge, programmatic verifiers)."""

from apportion.reward.base import OutcomeScorer
from apportion.reward.judge import JudgeOptions, LLMJudge, parse_judge_score, parse_verdict
from apportion.reward.prm_http import PRMClient, PRMOptions
from apportion.reward.process import AGGREGATIONS, PrefixScoreCache, ProcessScorer, aggregate, score_paths
from apportion.reward.process_judge import JudgeProcessScorer, ProcessJudgeOptions, read_verdict
from apportion.reward.self_certainty import SelfCertainty
from apportion.reward.verifiers import CallableVerifier, check_game24, game24_numbers, game24_verifier

SCORERS = {"self-certainty": SelfCertainty, "logprob": SelfCertainty, "judge": LLMJudge}

__all__ = [
    "AGGREGATIONS",
    "SCORERS",
    "CallableVerifier",
    "JudgeOptions",
    "JudgeProcessScorer",
    "LLMJudge",
    "OutcomeScorer",
    "PRMClient",
    "PRMOptions",
    "PrefixScoreCache",
    "ProcessJudgeOptions",
    "ProcessScorer",
    "SelfCertainty",
    "aggregate",
    "check_game24",
    "game24_numbers",
    "game24_verifier",
    "parse_judge_score",
    "parse_verdict",
    "read_verdict",
    "score_paths",
]
