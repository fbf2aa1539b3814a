"""The fast paths of the per-sample work (answer extraction and normalisation, clustering, votes,
reading log-probabilities) against the plain code they replaced, kept here as oracles: the same
answers, classes, votes and values on arbitrary inputs."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from apportion.algorithms.voting import tally
from apportion.answers import extract, normalize
from apportion.answers.equivalence import Equivalence
from apportion.bench.mock_server import reply_text
from apportion.lm import http_reply
from apportion.lm.base import SamplingParams
from apportion.result import Candidate

FRAGMENTS = ["The answer is", "the answer is ", "ANSWER IS", "AnSwEr would be", "answer will be", "answer = ",
             "answer:", "Answer: ", "anſwer is", "answers", "####", "#### ", "########", "\\boxed{", "\\fbox {", "}",
             "{", "$", "$$", "\\frac{3}{4}", "\\dfrac12", "x = ", "==", "1,000", "12,345,678", "2.50", ".5", "-3", "+4",
             "1/2", "3 / 4", "0042", "7", "42", " dollars", "%", "\\%", "\\text{cm}", "~", "^\\circ", "°", ".", ". ",
             ",", ", so ", ", which ", "\n", " ", "\t", ";", "\\left(", "\\right)", "\\,", "١٢", "\u0663", "½", "²",
             "USD ", "US$", "€", "rs.", "**", "\\(", "\\)", "\\[", "\\]", "Tuesday", "(B)", "N", "İ", "K", "apples"]
texts = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join), st.text(max_size=60))
answers = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=4).map("".join), st.text(max_size=12),
                    st.from_regex(r"-?\d{1,45}(\.\d{1,3})?", fullmatch=True))


# -- the code the fast paths replaced ---------------------------------------------------------------

def _ref_last_boxed(text: str) -> str | None:
    starts = [m.end() for m in extract._BOX_OPEN_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _ref_extract(text: str) -> tuple[str, str] | None:
    if not text:
        return None
    boxed = _ref_last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    for method, pattern in (("hashes", extract._HASHES_RE), ("answer_is", extract._ANSWER_IS_RE),
                            ("answer_colon", extract._ANSWER_COLON_RE)):
        for match in reversed(list(pattern.finditer(text))):
            value = extract._first_clause(text[match.end():].split("\n", 1)[0])
            if value and extract._plausible(value):
                return value, method
    numbers = extract._NUMBER_RE.findall(text)
    return (numbers[-1].strip(), "last_number") if numbers else None


def _ref_numeric_value(text: str) -> Fraction | None:
    t = text.replace(" ", "")
    if not t or len(t) > 40:
        return None
    try:
        if "/" in t:
            num, _, den = t.partition("/")
            if not den or "." in den:
                return None
            return Fraction(num) / Fraction(den) if Fraction(den) != 0 else None
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _ref_normalize(raw: str) -> str:
    n = normalize
    s = raw.strip()
    for _ in range(3):
        before = s
        for pattern, repl in n._WRAPPERS:
            s = pattern.sub(repl, s).strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    s = n._TEXT_CMD.sub(r" \1", s)
    s = n._SPACE_CMDS.sub(" ", s)
    s = n._DEGREES.sub("", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = n._FRAC.sub(r"\1/\2", s)
    s = n._FRAC_SHORT.sub(r"\1/\2", s)
    assign = n._ASSIGN.match(s)
    if assign:
        s = assign.group(1).strip()
    s = n._CURRENCY.sub("", s).strip()
    s = n._THOUSANDS.sub("", s)
    numeric = n._NUMBER_WITH_UNIT.match(s)
    if numeric:
        s = numeric.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    value = _ref_numeric_value(s)
    return n.format_number(value) if value is not None else (s or raw.strip())


def _ref_cluster(eq: Equivalence, items: list[str | None]) -> list[int | None]:
    def same(a: str, b: str) -> bool:
        ka, kb = eq.key(a), eq.key(b)
        if ka == kb:
            return True
        va, vb = _ref_numeric_value(ka), _ref_numeric_value(kb)
        if va is not None and vb is not None:
            return va == vb or math.isclose(float(va), float(vb), rel_tol=eq.rel_tol, abs_tol=0.0)
        return ka.replace(" ", "").lower() == kb.replace(" ", "").lower()

    reps: list[str] = []
    by_key: dict[str, int] = {}
    out: list[int | None] = []
    for a in items:
        if a is None:
            out.append(None)
            continue
        k = eq.key(a)
        if k not in by_key:
            idx = next((i for i, rep in enumerate(reps) if same(rep, k)), None)
            if idx is None:
                idx = len(reps)
                reps.append(k)
            by_key[k] = idx
        out.append(by_key[k])
    return out


def _ref_logprobs(choice: dict) -> tuple[float, ...] | None:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list):
        values = [t.get("logprob") for t in content if isinstance(t, dict)]
    else:
        raw = lp.get("token_logprobs")
        values = raw if isinstance(raw, list) else []
    clean = tuple(float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    return clean or None


# -- the properties -----------------------------------------------------------------------------------

@settings(max_examples=400)
@given(texts)
def test_extraction_finds_what_the_plain_scan_found(text):
    found = extract.extract_answer(text)
    assert (None if found is None else (found.text, found.method)) == _ref_extract(text)
    assert extract.last_boxed(text) == _ref_last_boxed(text)


def test_extraction_on_the_mock_replies():
    for seed in range(20):
        for index in range(64):
            text = reply_text(seed, index)
            found = extract.extract_answer(text)
            assert found is not None and (found.text, found.method) == _ref_extract(text)


@settings(max_examples=400)
@given(answers)
def test_normalisation_is_unchanged(raw):
    assert normalize.normalize_answer.__wrapped__(raw) == _ref_normalize(raw)  # uncached
    assert normalize.normalize_answer(raw) == _ref_normalize(raw)
    assert normalize.numeric_value(raw) == _ref_numeric_value(raw)


pool = st.sampled_from(["42", "42.0", "$42", "41", "0.5", "1/2", "1/3", "0.3333333", "0.33333333333", "10000000",
                        "10000001", "-3", "x", "X", "x y", "Tuesday", "1e3", "1000", "\\frac{1}{2}"])


@given(st.lists(st.one_of(st.none(), pool, answers), max_size=40))
def test_classes_are_unchanged(items):
    assert Equivalence(use_math_verify=False).cluster(items) == _ref_cluster(Equivalence(use_math_verify=False), items)


@given(st.lists(st.tuples(st.one_of(st.none(), pool), st.sampled_from([None, -0.1, -2.0]), st.integers(0, 3)),
                max_size=30))
def test_votes_are_set_as_replace_would(rows):
    cands = [Candidate(f"t{i}", a, a, "m", "stop", 3, lp, votes=v) for i, (a, lp, v) in enumerate(rows)]
    t = tally(cands, Equivalence(use_math_verify=False))
    expected = [replace(c, votes=v.votes) for c, v in zip(cands, t.candidates)]
    assert list(t.candidates) == expected
    for c, v in zip(cands, t.candidates):
        assert c.with_votes(v.votes) == replace(c, votes=v.votes)


values = st.one_of(st.floats(allow_nan=False), st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=2))
tokens = st.one_of(st.fixed_dictionaries({"logprob": values}), st.fixed_dictionaries({}), st.none(), st.integers())


@given(st.one_of(
    st.fixed_dictionaries({"logprobs": st.fixed_dictionaries({"content": st.lists(tokens, max_size=6)})}),
    st.fixed_dictionaries({"logprobs": st.fixed_dictionaries({"token_logprobs": st.lists(values, max_size=6)})}),
    st.fixed_dictionaries({"logprobs": st.one_of(st.none(), st.just([]), st.just({"content": "x"}))})))
def test_log_probabilities_are_read_as_before(choice):
    assert http_reply._choice_logprobs(choice) == _ref_logprobs(choice)


@given(st.lists(st.one_of(st.integers(-1, 6), st.none(), st.booleans(), st.just(1.0), st.just("1")), max_size=6))
def test_choices_keep_the_order_a_sort_by_index_gives(indices):
    data = {"choices": [{"index": i, "message": {"content": f"c{k}"}} for k, i in enumerate(indices)]}
    got = [s.text for s in http_reply.read_reply(data, SamplingParams(n=max(1, len(indices))), 10).samples]
    assert got == [c["message"]["content"] for c in sorted(data["choices"], key=http_reply._index)]


def test_slot_builders_build_what_the_constructors_build():
    import dataclasses

    import pytest

    from apportion._slots import slot_builder
    from apportion.lm.base import Sample

    sample = Sample("t", "stop", 3, (-0.1, -0.2, -0.3), None, "why")
    assert slot_builder(Sample)(*dataclasses.astuple(sample)) == sample
    built = Candidate.from_sample(sample, "4", "4", "answer_is", "m")
    assert built == Candidate("t", "4", "4", "answer_is", "stop", 3, sample.mean_logprob, logprobs=sample.logprobs,
                              model="m")
    assert hash(built) == hash(dataclasses.replace(built)) and built.with_votes(2).votes == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.votes = 1  # type: ignore[misc]

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int
        b: int = 0

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("a < 0")

    with pytest.raises(ValueError):  # a __post_init__ is never skipped
        slot_builder(Checked, ("a",))(-1)
    assert slot_builder(Checked, ("a",))(3) == Checked(3)
    with pytest.raises(TypeError):
        slot_builder(Checked, ("b",))  # a field without a default left out


# -- votes set in place -----------------------------------------------------------------------------

def test_a_tally_sets_fresh_votes_in_place_and_copies_every_other_change():
    eq = Equivalence()
    old = [Candidate(f"The answer is {a}", a, a, "answer_is", "stop", 5, None) for a in ("1", "2")]
    new = [Candidate(f"The answer is {a}", a, a, "answer_is", "stop", 5, None) for a in ("1", "1")]
    t = tally([*old, *new], eq, fresh=2)
    assert [c.votes for c in t.candidates] == [3, 1, 3, 3]
    assert t.candidates[2] is new[0] and t.candidates[3] is new[1]  # fresh: set in place
    assert t.candidates[0] is not old[0] and old[0].votes == 0 and old[1].votes == 0  # seen before: copied
    assert tally([*old, *new], eq).candidates[2] is new[0]  # votes already right: nothing to copy


async def test_self_consistency_never_changes_a_result_it_already_gave():
    """Candidates of an earlier (interim) result keep the votes they had when it was given, though
    later rounds change the vote: only candidates no result holds yet are set in place."""
    from apportion.algorithms.base import SamplingOptions
    from apportion.algorithms.self_consistency import SelfConsistency, SelfConsistencyOptions
    from apportion.algorithms.stopping import ESC
    from apportion.budget.units import Budget
    from apportion.lm.scripted import ScriptedBackend

    lm = ScriptedBackend(["The answer is 7.", "The answer is 8.", "The answer is 7.", "The answer is 9."])
    algo = SelfConsistency(SelfConsistencyOptions(SamplingOptions(), ESC(window=2)))
    seen = []
    async for result in algo.stream(lm, "What is 3 + 4?", Budget(generations=8), seed=0):
        seen.append((result, [c.votes for c in result.candidates]))
    assert len(seen) >= 3 and any(len(r.candidates) < len(seen[-1][0].candidates) for r, _ in seen)
    assert all([c.votes for c in r.candidates] == votes for r, votes in seen)
    final = seen[-1][0]
    assert [c.votes for c in final.candidates] == [sum(d.answer == c.answer for d in final.candidates)
                                                   for c in final.candidates]
