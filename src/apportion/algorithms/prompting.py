"""Prompt modes: how a sampling algorithm words the question so that each answer costs fewer tokens.

Any sampling algorithm takes one through ``SamplingOptions.prompt_mode`` (None: the plain prompt):

- ``Tale`` (Han et al. 2024, token-budget-aware reasoning): a token budget for this problem,
  estimated from the question (free) or asked of the model (a "planning" call, charged to the run's
  ledger in tokens, dollars and seconds but not as a generation), stated in the prompt: "Let's
  think step by step and use less than N tokens."
- ``ChainOfDraft`` (Xu et al. 2025): "Think step by step, but only keep a minimum draft for each
  thinking step, with at most N words."

Both add their instruction to the end of the last user message (or of a raw prompt), so the
system prompt (which asks for the answer's format) stays as it is. The stated budget and word
limit are requests to the model, not limits: ``SamplingOptions.max_tokens`` and the run's budget
are what bind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apportion.errors import BackendError, BudgetExhausted, ConfigError
from apportion.lm.base import Message, Prompt, SamplingParams
from apportion.lm.metered import MeteredLM

TALE_ESTIMATORS = ("features", "model")
_NUMBER_RE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_ESTIMATE_PROMPT = (
    "Estimate how many tokens a short but complete step-by-step solution of the problem below needs. "
    "Reply with one number only.\n\nProblem: {question}"
)


@dataclass(frozen=True, slots=True)
class Tale:
    """TALE: state a per-problem token budget in the prompt.

    ``budget`` fixes it; otherwise ``estimator`` "features" sets it to ``base`` + ``per_step`` x
    (numbers in the question - 1), on the reasoning that a word problem with k quantities needs
    about k - 1 operations, and "model" asks the model itself (TALE's zero-shot estimator), falling
    back to the features when the reply holds no number or the budget cannot pay for the question.
    The estimate is clamped to [``min_budget``, ``max_budget``]."""

    estimator: str = "features"
    budget: int | None = None
    base: int = 30
    per_step: int = 25
    min_budget: int = 16
    max_budget: int = 512
    estimate_tokens: int = 16
    """Most tokens of the model's reply to the estimate question."""
    mode: str = field(default="tale", init=False)

    def __post_init__(self) -> None:
        if self.estimator not in TALE_ESTIMATORS:
            raise ConfigError(f"TALE estimator must be one of {TALE_ESTIMATORS}, got {self.estimator!r}")
        if not 1 <= self.min_budget <= self.max_budget:
            raise ConfigError(f"TALE needs 1 <= min_budget <= max_budget, got {self.min_budget}, {self.max_budget}")
        for name in ("base", "per_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TALE {name} must be >= 0, got {getattr(self, name)}")
        if self.budget is not None and self.budget < 1:
            raise ConfigError(f"TALE budget must be >= 1, got {self.budget}")
        if self.estimate_tokens < 1:
            raise ConfigError(f"TALE estimate_tokens must be >= 1, got {self.estimate_tokens}")

    def from_features(self, question: str) -> int:
        steps = max(1, len(_NUMBER_RE.findall(question)) - 1)
        return self.clamp(self.base + self.per_step * steps)

    def clamp(self, value: int) -> int:
        return max(self.min_budget, min(self.max_budget, value))

    @staticmethod
    def instruction(budget: int) -> str:
        return f"Let's think step by step and use less than {budget} tokens."


@dataclass(frozen=True, slots=True)
class ChainOfDraft:
    """Chain of Draft: a word limit per reasoning step."""

    words: int = 5
    mode: str = field(default="cod", init=False)

    def __post_init__(self) -> None:
        if self.words < 1:
            raise ConfigError(f"Chain of Draft words must be >= 1, got {self.words}")

    def instruction(self) -> str:
        return (f"Think step by step, but only keep a minimum draft for each thinking step, "
                f"with at most {self.words} words.")


PromptMode = Tale | ChainOfDraft
PROMPT_MODES = ("plain", "tale", "cod")


def parse_prompt_mode(text: str) -> PromptMode | None:
    """``plain``, ``tale[:key=value,...]`` or ``cod[:words=N]`` (the CLI's ``--prompt-mode``)."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower().replace("_", "-")
    values: dict[str, str] = {}
    for part in rest.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError(f"prompt mode setting {part!r} is not key=value")
        values[key.strip().lower().replace("-", "_")] = value.strip()
    if name == "plain":
        if values:
            raise ConfigError("the plain prompt mode has no settings")
        return None
    if name in ("tale", "cod", "chain-of-draft"):
        cls: type[Tale] | type[ChainOfDraft] = Tale if name == "tale" else ChainOfDraft
        known = [f for f in cls.__dataclass_fields__ if f != "mode"]
        aliases = {"min": "min_budget", "max": "max_budget"}
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            key = aliases.get(key, key)
            if key not in known:
                raise ConfigError(f"unknown {name} setting {key!r}; known: {', '.join(known)}")
            if key == "estimator":
                kwargs[key] = value
                continue
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise ConfigError(f"{name} setting {key} must be a whole number, got {value!r}") from None
        return cls(**kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"unknown prompt mode {text!r}; known: {', '.join(PROMPT_MODES)}")


def spell_prompt_mode(mode: PromptMode | None) -> str:
    """``mode`` as ``--prompt-mode`` spells it (what ``parse_prompt_mode`` reads back); settings
    left at their defaults are left out, so a bank's record reads "cod", not every default."""
    if mode is None:
        return "plain"
    defaults = type(mode)()
    changed = [f"{name}={getattr(mode, name)}" for name in type(mode).__dataclass_fields__
               if name != "mode" and getattr(mode, name) != getattr(defaults, name)]
    return mode.mode + (":" + ",".join(changed) if changed else "")


def replayable_prompt_mode(mode: PromptMode | None) -> str | None:
    """Why samples drawn under ``mode`` cannot stand in for live runs (None: they can). A replay
    asks the question again; TALE's budget asked of the model is a call no bank recorded."""
    if isinstance(mode, Tale) and mode.budget is None and mode.estimator == "model":
        return ("TALE's budget estimated by the model is a planning call a bank does not record; "
                "draw with the features estimator or a fixed budget, or run the cells --live")
    return None


async def apply_prompt_mode(mode: PromptMode, lm: MeteredLM, prompt: Prompt, question: str,
                            seed: int | None) -> tuple[Prompt, list[str]]:
    """``prompt`` reworded for ``mode``, and notes saying what was done (TALE's budget and where it
    came from). A TALE estimate asked of the model is charged to ``lm``'s ledger as planning."""
    notes: list[str] = []
    if isinstance(mode, ChainOfDraft):
        return _with_instruction(prompt, mode.instruction()), notes
    if mode.budget is not None:
        budget, source = mode.budget, "fixed"
    elif mode.estimator == "model":
        estimate, why = await _ask_model(mode, lm, question, seed)
        if estimate is None:
            budget, source = mode.from_features(question), f"from the question's numbers ({why})"
        else:
            budget, source = mode.clamp(estimate), f"the model's estimate ({estimate})"
    else:
        budget, source = mode.from_features(question), "from the question's numbers"
    notes.append(f"TALE: a budget of {budget} tokens stated in the prompt ({source})")
    return _with_instruction(prompt, mode.instruction(budget)), notes


async def _ask_model(mode: Tale, lm: MeteredLM, question: str, seed: int | None) -> tuple[int | None, str]:
    params = SamplingParams(max_tokens=mode.estimate_tokens, temperature=0.0, seed=seed)
    try:
        completion = await lm.planning().generate(Prompt.chat(_ESTIMATE_PROMPT.format(question=question)), params)
    except BudgetExhausted:
        return None, "the budget could not pay for asking the model"
    except BackendError as exc:
        return None, f"asking the model failed: {exc}"
    text = completion.samples[0].text if completion.samples else ""
    found = _NUMBER_RE.search(text)
    if found is None:
        return None, f"the model's estimate held no number: {text.strip()[:40]!r}"
    try:
        return int(float(found.group().replace(",", ""))), ""
    except ValueError:  # pragma: no cover - the pattern only matches numbers
        return None, "the model's estimate was not a number"


def _with_instruction(prompt: Prompt, instruction: str) -> Prompt:
    if not prompt.is_chat:
        return Prompt(text=f"{(prompt.text or '').rstrip()}\n{instruction}\n", assistant_prefix=prompt.assistant_prefix)
    messages = list(prompt.messages)
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        messages.append(Message("user", instruction))
    else:
        messages[last] = Message("user", f"{messages[last].content.rstrip()}\n{instruction}")
    return Prompt(tuple(messages), None, prompt.assistant_prefix)
