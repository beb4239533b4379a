"""Bad and degenerate patching pairs (issue 10, items 6 and 7): a pairs file that is not UTF-8,
has a non-object line, a missing / non-string / empty field or misaligned prompts is one
WorkbenchError naming file:line; pairs that make the logit difference identically equal are
rejected naming the pair; nearly equal clean / corrupted means warn, and no numpy warning leaks."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

from circuits.baseline import baseline
from circuits.patching import _effects, activation_patching, path_patching
from circuits.tasks import Pair, colored_objects, ioi, make_pair, read_pairs
from tests.test_patching import tiny_pairs
from workbench.errors import WorkbenchError, WorkbenchWarning

GOOD = {"id": "a", "clean": "the king said", "corrupted": "the man said", "correct": " king", "incorrect": " man"}


@pytest.fixture(scope="module")
def tok(tiny_dirs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dirs["llama"])


def write_lines(path, *lines) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return str(path)


# -- the pairs file ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "expected a JSON object, got a list"),
        ('"x"', "expected a JSON object, got a string"),
        ("3", "expected a JSON object, got a number"),
        ("null", "expected a JSON object, got null"),
        ("{not json", "not valid JSON"),
        ({k: v for k, v in GOOD.items() if k != "incorrect"}, "missing field 'incorrect'"),
        ({k: v for k, v in GOOD.items() if k not in ("clean", "correct")}, "missing fields 'clean', 'correct'"),
        ({**GOOD, "clean": 3}, "'clean' must be a string, got a number"),
        ({**GOOD, "corrupted": ["the", "man"]}, "'corrupted' must be a string, got a list"),
        ({**GOOD, "correct": None}, "'correct' must be a string, got null"),
        ({**GOOD, "incorrect": True}, "'incorrect' must be a string, got a boolean"),
        ({**GOOD, "id": [1]}, "'id' must be a string or an integer, got a list"),
        ({**GOOD, "id": True}, "'id' must be a string or an integer, got a boolean"),
        ({**GOOD, "id": 1.5}, "'id' must be a string or an integer, got a number"),
        ({**GOOD, "correct": ""}, "'correct' is empty"),
        ({**GOOD, "incorrect": ""}, "'incorrect' is empty"),
        ({**GOOD, "clean": ""}, "'clean' is empty"),
        ({**GOOD, "corrupted": "   "}, "'corrupted' is empty"),
        ({**GOOD, "corrupted": "the man said unto them"}, "clean has 3 tokens and corrupted 5"),
        ({**GOOD, "correct": " king said"}, "is 2 tokens, not one"),
        ({**GOOD, "incorrect": " king"}, "the same token"),
        ({**GOOD, "corrupted": "the king said"}, "the same tokens"),
    ],
)
def test_bad_pair_lines_name_file_and_line(tok, tmp_path, line, message):
    f = write_lines(tmp_path / "pairs.jsonl", GOOD | {"id": "first"}, "", line)
    with pytest.raises(WorkbenchError) as err:
        read_pairs(f, tok)
    assert err.value.message.startswith(f"{f}:3: "), err.value.message
    assert message in err.value.message
    assert err.value.fix and "\n" not in err.value.message


def test_pairs_file_not_utf8_names_the_line(tok, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_bytes(
        json.dumps(GOOD).encode()
        + b"\n"
        + json.dumps({**GOOD, "id": "b", "clean": "caf\xe9"}).encode("utf-8")[:-20]
        + b"\xe9\xff x\n"
    )
    with pytest.raises(WorkbenchError, match=rf"{f}:2: not UTF-8") as err:
        read_pairs(f, tok)
    assert "UTF-8" in err.value.fix


def test_pairs_file_duplicate_ids_and_int_ids(tok, tmp_path):
    f = write_lines(tmp_path / "p.jsonl", GOOD, {**GOOD, "clean": "the man said", "corrupted": "the king said"})
    with pytest.raises(WorkbenchError, match=r"p.jsonl:2: duplicate pair id 'a'"):
        read_pairs(f, tok)
    f = write_lines(tmp_path / "q.jsonl", {**GOOD, "id": 7}, {k: v for k, v in GOOD.items() if k != "id"})
    assert [p.id for p in read_pairs(f, tok)] == ["7", "2"]  # an int id, and the line number when absent


def test_pairs_file_with_a_byte_order_mark(tok, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    assert [p.id for p in read_pairs(f, tok)] == ["a"]


# -- degenerate pairs -------------------------------------------------------------------------
def test_answers_that_tokenize_to_the_same_id_are_rejected(tok):
    # the word-level tiny tokenizer drops the space: " king" and "king" are one token
    with pytest.raises(
        WorkbenchError, match=r"pair 'u': the correct and incorrect answers \(' king' and 'king'\) are the same token"
    ):
        make_pair(tok, "u", "the king said", "the man said", " king", "king")


def test_unknown_word_answers_are_rejected(tok):
    """Every out-of-vocabulary word is the same [UNK] answer."""
    with pytest.raises(
        WorkbenchError, match=r"pair 'w': the incorrect answer ' qwerty' is not in the tokenizer's vocabulary"
    ):
        make_pair(tok, "w", "the king said", "the man said", " king", " qwerty")


def test_prompts_that_tokenize_the_same_are_rejected(tok):
    with pytest.raises(
        WorkbenchError,
        match=r"pair 'v': the clean and corrupted prompts \('the xyzzy said' and 'the qwerty said'\) "
        r"are the same tokens",
    ):
        make_pair(tok, "v", "the xyzzy said", "the qwerty said", " king", " man")


def test_built_in_tasks_refuse_a_vocabulary_without_their_words(tok):
    """The tiny word-level vocabulary knows one of the names and one colour: every other maps to
    [UNK], which used to count as "a single token" and made every IOI pair degenerate (the same
    answer token, the same prompt tokens), so patching on tiny-llama gave NaN."""
    with pytest.raises(WorkbenchError, match="fewer than 3 names"):
        ioi(tok, n=4)
    with pytest.raises(WorkbenchError, match="fewer than 3 colours"):
        colored_objects(tok, n=4)


@pytest.mark.smollm2
def test_built_in_tasks_have_no_degenerate_pairs_on_smollm2():
    from transformers import AutoTokenizer

    from workbench.models.embedded import ensure_embedded

    tok = AutoTokenizer.from_pretrained(ensure_embedded(quiet=True))
    pairs = ioi(tok, n=16, seed=3) + colored_objects(tok, n=16, seed=3)
    assert len(pairs) == 32
    for p in pairs:
        assert p.correct != p.incorrect and p.clean != p.corrupted


@pytest.mark.parametrize("kind", ["same answer", "same prompt"])
def test_one_degenerate_pair_among_good_ones_is_rejected_before_any_forward(tiny_models, kind, monkeypatch):
    model = tiny_models["llama"]
    pairs = tiny_pairs(model, n=4)
    bad = pairs[2]
    pairs[2] = (
        dataclasses.replace(bad, incorrect=bad.correct)
        if kind == "same answer"
        else dataclasses.replace(bad, corrupted=list(bad.clean))
    )
    import circuits.patching as patching

    monkeypatch.setattr(patching, "logit_diff", lambda *a, **k: pytest.fail("a forward ran before the check"))
    with pytest.raises(WorkbenchError, match=rf"pair {bad.id!r}"):
        baseline(model, pairs)
    with pytest.raises(WorkbenchError, match=rf"pair {bad.id!r}"):
        activation_patching(model, pairs)


def swapped_pairs(model) -> list[Pair]:
    """Two pairs that are each other's corruption: the mean clean and corrupted logit differences
    are equal, although neither pair is degenerate."""
    p = tiny_pairs(model, n=1, seed=5)[0]
    return [p, Pair("swapped", list(p.corrupted), list(p.clean), p.correct, p.incorrect)]


def test_nearly_equal_mean_logit_differences_warn_once_and_leak_no_numpy_warning(tiny_models):
    model = tiny_models["llama"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = baseline(model, swapped_pairs(model))
        out = activation_patching(model, base, heads=[(0, 0), (1, 1)], n_boot=50)
        path_patching(model, base, senders=[(0, 1)], n_boot=50)
    assert [w.category for w in caught] == [WorkbenchWarning], [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "nearly equal" in msg and "normalised effects" in msg and "\n" not in msg
    assert out.value.isna().all()


def test_a_real_difference_does_not_warn(tiny_models):
    model = tiny_models["llama"]
    # corrupting the last token moves the last position's logits most
    pairs = [
        dataclasses.replace(p, corrupted=p.corrupted[:-1] + [(p.clean[-1] + 7) % model.vocab_size])
        for p in tiny_pairs(model, n=4)
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = baseline(model, pairs)
        activation_patching(model, base, heads=[(0, 0)], n_boot=20)
    assert abs(float(base.ld_clean.mean() - base.ld_corrupted.mean())) > 1e-2  # the test means something
    assert caught == []


def test_bootstrap_over_an_all_nan_denominator_is_quiet(tiny_models):
    """Every resample's denominator 0/0: nanpercentile over all-NaN rows would warn."""
    model = tiny_models["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WorkbenchWarning)
        base = baseline(model, tiny_pairs(model, n=3))
    flat = dataclasses.replace(base, ld_corrupted=base.ld_clean.clone())
    ld = base.ld_clean.repeat(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eff, lo, hi = _effects(flat, ld, n_boot=30)
    assert np.isnan(eff).all() and np.isnan(lo).all() and np.isnan(hi).all()
