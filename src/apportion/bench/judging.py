"""How a benchmark question's answer is judged right: against its gold answer, or by a checker.

- "gold": the answer equals the dataset's gold answer under the project's equivalence (exact
  numbers, else math-verify).
- "game24": a Game of 24 puzzle has no gold answer; any expression that uses the puzzle's four
  numbers once each and equals 24 is right (``reward.verifiers.check_game24``, the check the
  ``game24`` process scorer runs). The expression judged is the answer as written in the chosen
  response ("The answer is (4+8)*(3-1)"), not its normalised form: normalising reads
  "(4 + 8) * (3 - 1) = 24" as "24", which says nothing about the numbers used.

A judge sees what a run returned: its normalised answer and the response it came from.
"""

from __future__ import annotations

from typing import Protocol

from apportion.answers.equivalence import Equivalence
from apportion.answers.extract import read_answer
from apportion.banks import Problem
from apportion.errors import ConfigError
from apportion.reward.verifiers import check_game24, game24_numbers

JUDGES = ("gold", "game24")


class Judge(Protocol):
    name: str

    def judge(self, problem: Problem, answer: str | None, response: str | None) -> tuple[bool, str | None]:
        """Whether the run's answer is right, and the answer to record (what was judged)."""
        ...


class GoldJudge:
    """Right where the answer is equivalent to the problem's gold answer."""

    name = "gold"

    def __init__(self, equivalence: Equivalence | None = None) -> None:
        self.equivalence = equivalence or Equivalence()

    def judge(self, problem: Problem, answer: str | None, response: str | None) -> tuple[bool, str | None]:
        return answer is not None and self.equivalence.same(answer, problem.answer), answer


class Game24Judge:
    """Right where the response's final answer, as written, is an expression that makes 24 from
    the puzzle's four numbers (read from the question, as the ``game24`` verifier reads them)."""

    name = "game24"

    def judge(self, problem: Problem, answer: str | None, response: str | None) -> tuple[bool, str | None]:
        numbers = game24_numbers(problem.question)
        if numbers is None:
            raise ConfigError(f"question {problem.id} holds no four numbers: it is not a Game of 24 puzzle")
        # the answer as written; without a response (a peer's reply is its response) the answer itself
        written = read_answer(response)[1] if response else answer
        if written is None:
            return False, None
        return check_game24(numbers, written) is True, written


def make_judge(name: str, equivalence: Equivalence | None = None) -> Judge:
    if name == "gold":
        return GoldJudge(equivalence)
    if name == "game24":
        return Game24Judge()
    raise ConfigError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
