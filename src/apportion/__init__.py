"""apportion: budget-controlled inference-time scaling for language models.

    from apportion import Budget, LlamaEmbeddedBackend, SelfConsistency
    result = SelfConsistency().run_sync(LlamaEmbeddedBackend(), "What is 17 + 25?", Budget(generations=8))
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
    "Algorithm", "ApportionError", "Backend", "BackendError", "BackendUnavailable", "BestOfN",
    "BestOfNOptions", "Budget", "BudgetError", "BudgetExhausted", "BudgetForcing", "BudgetForcingOptions",
    "Candidate", "ChainOfDraft", "ConfigError",
    "EmbeddedOptions", "Equivalence", "HTTPOptions", "JudgeOptions", "LLMJudge", "Ledger",
    "LlamaEmbeddedBackend", "MeteredLM", "ModelNotFound", "OpenAIHTTPBackend", "Price", "PriceTable",
    "ProgramAided", "ProgramAidedOptions",
    "Prompt", "Result", "SamplingOptions", "SamplingParams", "ScriptedBackend", "SelfCertainty",
    "SelfConsistency", "SelfConsistencyOptions", "Spend", "Tale", "Usage", "extract_answer", "make_algorithm",
    "normalize_answer",
]
