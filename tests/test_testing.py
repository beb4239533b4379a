"""workbench.testing: the reference-recomputation helpers plugin authors get, checked on built-in probes.

``assert_probe_matches`` must pass where the probe is right and fail, naming the metric and the
head, where the reference disagrees; the package must import without pytest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.reference import entropy_reference, sink_reference
from workbench import get_probe
from workbench.testing import ReferenceInputs, assert_probe_matches, unequal_prompts


def sink_ref(ref: ReferenceInputs, epsilon: float = 0.3):
    mass, rate, n = sink_reference(ref.patterns, epsilon)
    return {"sink_mass": {k: (v, n) for k, v in mass.items()}, "sink_rate": {k: (v, n) for k, v in rate.items()}}


def test_a_built_in_probe_matches_the_projects_own_reference(tiny_models):
    for arch, model in tiny_models.items():
        table = assert_probe_matches(get_probe("sink", epsilon=0.2), lambda r: sink_ref(r, 0.2), model)
        assert set(table.metric) == {"sink_mass", "sink_rate"}, arch
        assert len(table) == 2 * model.n_layers * model.n_heads


def test_windows_and_the_default_padded_batch(tmp_path):
    """On the tiny Gemma (sliding windows of 8 keys), entropy_norm divides by the visible keys:
    the reference reads the windows from ``ref.windows``; the default prompts exceed the window."""
    from workbench.models.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path / "g", "gemma3_text", seed=1)

    def ref(r):
        assert max(len(p) for p in r.prompts) > 8 and r.windows[0] == 8
        ent, norm, n = entropy_reference(r.patterns, r.windows)
        return {"entropy": {k: (v, n) for k, v in ent.items()}, "entropy_norm": {k: (v, n) for k, v in norm.items()}}

    assert_probe_matches(get_probe("entropy"), ref, folder, atol=1e-4)


def test_a_wrong_reference_fails_naming_the_metric_and_head(tiny_models):
    model = tiny_models["llama"]

    def off_by_a_little(r):
        want = sink_ref(r)
        mass = dict(want["sink_mass"])
        value, n = mass[(1, 2)]
        mass[(1, 2)] = (value + 1e-3, n)
        return {**want, "sink_mass": mass}

    with pytest.raises(AssertionError, match=r"sink_mass layer 1 head 2: probe .* reference .*\|diff\| 0.001"):
        assert_probe_matches(get_probe("sink"), off_by_a_little, model)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: {"sink_mass": w["sink_mass"]}, "sink_rate: the probe reports it and the reference gives no values"),
        (lambda w: {**w, "extra": {(0, 0): 1.0}}, "extra: the reference gives values and the probe reports no rows"),
        (lambda w: {**w, "sink_mass": {k: (v, n + 1) for k, (v, n) in w["sink_mass"].items()}}, "n is 5, the ref"),
        (lambda w: {**w, "sink_rate": {(0, 0): w["sink_rate"][(0, 0)]}}, "sink_rate: the (layer, head)s differ"),
    ],
    ids=["metric-missing", "metric-extra", "count", "heads"],
)
def test_what_the_reference_does_not_cover_is_named(tiny_models, change, message):
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        assert_probe_matches(get_probe("sink"), lambda r: change(sink_ref(r)), tiny_models["llama"])


def test_prompts_of_one_length_are_refused(tiny_models):
    model = tiny_models["llama"]
    with pytest.raises(ValueError, match="two different lengths"):
        assert_probe_matches(get_probe("sink"), sink_ref, model, prompts=[[5, 6, 7], [8, 9, 10]])


def test_unequal_prompts_avoid_special_tokens():
    prompts = unequal_prompts(10, lengths=(30, 5), avoid=range(4))
    assert [len(p) for p in prompts] == [30, 5] and all(4 <= t < 10 for p in prompts for t in p.ids)
    assert prompts == unequal_prompts(10, lengths=(30, 5), avoid=range(4)), "seeded"


def test_the_fixtures_share_the_llama(tiny_model_dir, tiny_dirs):
    assert tiny_dirs["llama"] == tiny_model_dir and (tiny_model_dir / "config.json").is_file()


def test_workbench_testing_imports_without_pytest():
    """pytest is not a dependency of the workbench: only the fixtures module needs it."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "import workbench.testing as t; assert callable(t.assert_probe_matches)\n"
        "try:\n    import workbench.testing.fixtures\nexcept ImportError:\n    print('fixtures need pytest')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fixtures need pytest"
