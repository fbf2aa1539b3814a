"""Program-aided answers on the embedded model: its programs run in the sandbox within the budget.
Short on purpose (two programs of at most 128 tokens): it shows the path end to end, not accuracy."""

import asyncio

import pytest

from apportion import Budget, LlamaEmbeddedBackend, ProgramAided, ProgramAidedOptions, SamplingOptions
from apportion.algorithms.program_aided import PROGRAM_SYSTEM_PROMPT, extract_program

pytestmark = pytest.mark.embedded


def test_programs_from_the_embedded_model_run_within_the_budget():
    lm = LlamaEmbeddedBackend()
    try:
        alg = ProgramAided(ProgramAidedOptions(
            SamplingOptions(max_tokens=128, temperature=0.3, system_prompt=PROGRAM_SYSTEM_PROMPT), time_limit_s=2))
        result = asyncio.run(alg.run(lm, "What is 17 plus 25?", Budget.parse("gen=2,tool_calls=2"), seed=0))
    finally:
        asyncio.run(lm.aclose())
    spent = result.spent
    assert spent.generations == 2 and spent.tool_calls <= 2
    assert spent.tool_calls == sum(extract_program(c.text) is not None for c in result.candidates)
    assert spent.tool_calls == sum(r.kind == "tool" for r in result.trace)
    assert any(n.startswith("programs: 2 drawn") for n in result.notes)
