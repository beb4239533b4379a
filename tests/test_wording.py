"""How rules, units and definitions read on the page and in the terminal (issue 31, cosmetics)."""

from __future__ import annotations

from workbench.protocol.metrics import MetricInfo
from workbench.protocol.roles import Role
from workbench.report.definitions import described, summary_line


def test_a_low_role_reads_with_one_minus_sign_however_its_threshold_was_given():
    for given in (0.05, -0.05):
        role = Role("memory", "M", "context_direct_effect", given, "#000", "follows memory", sign=-1)
        assert role.rule() == "context_direct_effect <= -0.05"
        assert role.bound == -0.05 and role.op == "<="
        assert role.holds(-0.06) and not role.holds(-0.04)
    high = Role("sink", "S", "sink_mass", 0.3, "#000", "a sink", strict=True)
    assert high.rule() == "sink_mass > 0.3" and high.holds(0.31) and not high.holds(0.3)
    zero = Role("z", "Z", "m", 0.0, "#000", "zero", sign=-1)
    assert zero.rule() == "m <= 0", "never '-0'"


def test_a_unit_is_said_once():
    assert described(MetricInfo("nonneg", "mean entropy of a row, in nats", unit="nats")) == (
        "mean entropy of a row, in nats"
    )
    assert described(MetricInfo("nonneg", "mean entropy of a row", unit="nats")) == "mean entropy of a row (nats)"
    assert described(MetricInfo("signed", "direct effect on the logit difference", unit="logits")) == (
        "direct effect on the logit difference (logits)"
    ), "'logit' inside a word is not the unit 'logits'"


def test_the_summary_line_is_the_first_sentence_of_prose():
    text = "```text\nx = y\n```\n\nThe mean weight on the first token. Pooled over prompts.\n\nMore."
    assert summary_line(text) == "The mean weight on the first token."
    assert summary_line("| a | b |\n|---|---|\n\n- `m`: a bullet. Then more.") == "m: a bullet."


def test_workbench_probes_shows_a_default_made_by_a_factory_as_its_value(capsys):
    """A parameter whose default comes from a factory (a list) printed ``layers=PydanticUndefined``."""
    from workbench.cli import main

    assert main(["probes"]) == 0
    out = capsys.readouterr().out
    assert "PydanticUndefined" not in out
    assert "layers=[]" in out  # carve's layers
