"""apportion: budget-controlled inference-time scaling for language models.

    from apportion import Budget, LlamaEmbeddedBackend, SelfConsistency
    result = SelfConsistency().run_sync(LlamaEmbeddedBackend(), "What is 17 + 25?", Budget(generations=8))

Many prompts under one total budget: ``answer_batch(items, backend, Budget(total_tokens=...),
make_policy("compute-optimal"), lambda name: make_algorithm(name))`` (``allocate/``).
"""

__version__ = "0.1.0"

from apportion.algorithms import (
    Algorithm,
    BestOfN,
    BestOfNOptions,
    BudgetForcing,
    BudgetForcingOptions,
    ChainOfDraft,
    ProgramAided,
    ProgramAidedOptions,
    SamplingOptions,
    SelfConsistency,
    SelfConsistencyOptions,
    Tale,
    make_algorithm,
)
from apportion.allocate.engine import BatchResult, answer_batch
from apportion.allocate.policies import POLICIES, StrategyTable, ThinkRoute, make_policy
from apportion.answers import Equivalence, extract_answer, normalize_answer
from apportion.budget import Budget, Ledger, Price, PriceTable, Spend, Usage
from apportion.errors import (
    ApportionError,
    BackendError,
    BackendUnavailable,
    BudgetError,
    BudgetExhausted,
    ConfigError,
    ModelNotFound,
)
from apportion.lm import (
    Backend,
    EmbeddedOptions,
    HTTPOptions,
    LlamaEmbeddedBackend,
    MeteredLM,
    OpenAIHTTPBackend,
    Prompt,
    SamplingParams,
    ScriptedBackend,
)
from apportion.result import Candidate, Result
from apportion.reward import JudgeOptions, LLMJudge, SelfCertainty

__all__ = [
    "POLICIES", "Algorithm", "ApportionError", "Backend", "BackendError", "BackendUnavailable", "BatchResult",
    "BestOfN",
    "BestOfNOptions", "Budget", "BudgetError", "BudgetExhausted", "BudgetForcing", "BudgetForcingOptions",
    "Candidate", "ChainOfDraft", "ConfigError",
    "EmbeddedOptions", "Equivalence", "HTTPOptions", "JudgeOptions", "LLMJudge", "Ledger",
    "LlamaEmbeddedBackend", "MeteredLM", "ModelNotFound", "OpenAIHTTPBackend", "Price", "PriceTable",
    "ProgramAided", "ProgramAidedOptions",
    "Prompt", "Result", "SamplingOptions", "SamplingParams", "ScriptedBackend", "SelfCertainty",
    "SelfConsistency", "SelfConsistencyOptions", "Spend", "StrategyTable", "Tale", "ThinkRoute", "Usage",
    "answer_batch", "extract_answer", "make_algorithm", "make_policy", "normalize_answer",
]
