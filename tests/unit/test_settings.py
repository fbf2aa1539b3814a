"""Algorithms' own settings from text (``--set KEY=VALUE``): typed parsing, the options' own checks,
clear errors naming the key, and the command line reaching an algorithm through them."""

import json

import pytest
from typer.testing import CliRunner

from apportion.algorithms.debate import DebateOptions
from apportion.algorithms.particle_filtering import ParticleGibbsOptions
from apportion.algorithms.registry import ALGORITHMS, NEEDS_PROCESS_SCORER, SEARCHES, make_algorithm
from apportion.algorithms.settings import configure, parse_settings, settable
from apportion.cli import app
from apportion.errors import ConfigError
from tests.support.fake_openai import FakeOpenAI


def test_settings_parse_as_the_fields_declare():
    got = configure(ParticleGibbsOptions(), {"resampling": "multinomial", "ess_threshold": "1", "sweeps": "3",
                                             "width": "none", "temperature": "0.5"}, owner="pg")
    assert (got.resampling, got.ess_threshold, got.sweeps, got.width, got.temperature) == \
        ("multinomial", 1.0, 3, None, 0.5)
    assert isinstance(got.sweeps, int) and isinstance(got.ess_threshold, float)
    assert configure(DebateOptions(), {"agents": "4"}, owner="debate").agents == 4


def test_nested_options_are_not_settable_and_scalars_are():
    fields = settable(ParticleGibbsOptions())
    assert "sampling" not in fields and "steps" not in fields
    assert {"resampling", "ess_threshold", "sweeps", "width", "weighting", "answer"} <= set(fields)


@pytest.mark.parametrize(("settings", "message"), [
    ({"resample": "multinomial"}, "no setting 'resample'; its settings: aggregation, answer, ess_threshold"),
    ({"sweeps": "two"}, "setting sweeps must be int, got 'two'"),
    ({"ess_threshold": "2"}, "ess_threshold"),  # the options' own check
    ({"resampling": "stratified"}, "resampling"),
    ({"width": "x"}, "setting width must be int or none"),
])
def test_bad_settings_name_the_problem(settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        configure(ParticleGibbsOptions(), settings, owner="particle-gibbs")


def test_parse_settings_refuses_what_is_not_key_value_and_repeats():
    assert parse_settings(["ess-threshold=1", "sweeps = 2"]) == {"ess_threshold": "1", "sweeps": "2"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_settings(["sweeps"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_settings(["sweeps=1", "sweeps=2"])


def test_the_registry_applies_settings_and_knows_every_search():
    pf = make_algorithm("pf", settings={"resampling": "multinomial"})
    assert pf.name == "particle-filtering" and pf.options.resampling == "multinomial"  # type: ignore[attr-defined]
    assert make_algorithm("tot", settings={"breadth": "5"}).options.breadth == 5  # type: ignore[attr-defined]
    assert set(NEEDS_PROCESS_SCORER) <= set(SEARCHES) <= set(ALGORITHMS)
    with pytest.raises(ConfigError, match="self-consistency has no setting 'breadth'; its settings: none"):
        make_algorithm("self-consistency", settings={"breadth": "5"})


def test_the_command_line_sets_a_debate_and_refuses_a_wrong_key():
    def reply(body, index):
        return "We compute 6 * 7 = 42. The answer is 42."

    with FakeOpenAI(reply) as server:
        result = CliRunner().invoke(app, ["run", "What is 6 * 7?", "--algorithm", "debate", "--set", "agents=2",
                                          "--set", "rounds=1", "--budget", "gen=5,tokens=4000",
                                          "--base-url", server.base_url, "--model", server.model, "--json"])
        bodies = list(server.billing.bodies)
        wrong = CliRunner().invoke(app, ["run", "What is 6 * 7?", "--algorithm", "debate", "--set", "round=1",
                                         "--base-url", server.base_url, "--model", server.model])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["answer"] == "42" and out["spent"]["generations"] == 2
    assert [b.get("n", 1) for b in bodies] == [2, 1, 1]  # the first answers together, then one turn per agent
    assert wrong.exit_code == 2 and "debate has no setting 'round'" in wrong.output


def test_planning_takes_a_base_by_name_and_refuses_other_prefixes():
    from apportion.algorithms.planning import Planning
    from apportion.algorithms.registry import canonical, needs_process_scorer, takes_process_scorer

    plain = make_algorithm("plan")
    assert isinstance(plain, Planning) and plain.base.name == "self-consistency"
    over_beam = make_algorithm("planning/beam", settings={"approaches": "2"})
    assert isinstance(over_beam, Planning) and over_beam.base.name == "beam-search"
    assert over_beam.options.approaches == 2 and needs_process_scorer(over_beam)
    assert canonical("Plan/PF") == "planning/particle-filtering" and takes_process_scorer("planning/tot")
    assert not takes_process_scorer("planning") and not needs_process_scorer(make_algorithm("tot"))
    for bad in ("debate/sc", "planning/planning", "planning/"):
        with pytest.raises(ConfigError, match="only planning takes a base"):
            make_algorithm(bad)
    with pytest.raises(ConfigError, match="unknown algorithm 'nonesuch'"):
        make_algorithm("planning/nonesuch")
